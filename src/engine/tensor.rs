//! Conversions between the engine's `f32`/`i64` buffers and ONNX Runtime values of whatever
//! element type a graph declares (float32 or float16 for floats; int64 or int32 for integers).

use half::f16;
use ort::value::{DynValue, Tensor, TensorElementType};

/// Whether the engine can feed this element type with float data.
pub fn is_float(elem: TensorElementType) -> bool {
    matches!(
        elem,
        TensorElementType::Float32 | TensorElementType::Float16
    )
}

/// Whether the engine can feed this element type with integer data.
pub fn is_int(elem: TensorElementType) -> bool {
    matches!(elem, TensorElementType::Int64 | TensorElementType::Int32)
}

/// A value of element type `elem` (float32 or float16) holding `data` in `shape`.
pub fn float_value(elem: TensorElementType, shape: &[i64], data: &[f32]) -> ort::Result<DynValue> {
    let shape = shape.to_vec();
    match elem {
        TensorElementType::Float16 => {
            let v: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
            Ok(Tensor::from_array((shape, v))?.into_dyn())
        }
        TensorElementType::Float32 => Ok(Tensor::from_array((shape, data.to_vec()))?.into_dyn()),
        other => Err(ort::Error::new(format!(
            "cannot feed float data to a {other} input"
        ))),
    }
}

/// A value of element type `elem` (int64 or int32) holding `data` in `shape`.
pub fn int_value(elem: TensorElementType, shape: &[i64], data: &[i64]) -> ort::Result<DynValue> {
    let shape = shape.to_vec();
    match elem {
        TensorElementType::Int64 => Ok(Tensor::from_array((shape, data.to_vec()))?.into_dyn()),
        TensorElementType::Int32 => {
            let v = data
                .iter()
                .map(|&x| i32::try_from(x).map_err(|_| ort::Error::new("value exceeds int32")))
                .collect::<ort::Result<Vec<i32>>>()?;
            Ok(Tensor::from_array((shape, v))?.into_dyn())
        }
        other => Err(ort::Error::new(format!(
            "cannot feed integer data to a {other} input"
        ))),
    }
}

/// A float tensor read back as `f32`, with its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct FloatTensor {
    pub shape: Vec<i64>,
    pub data: Vec<f32>,
}

/// Copy a float32 or float16 output into `f32`.
pub fn to_f32(value: &DynValue) -> ort::Result<FloatTensor> {
    match value.data_type() {
        TensorElementType::Float32 => {
            let (shape, data) = value.try_extract_tensor::<f32>()?;
            Ok(FloatTensor {
                shape: shape.to_vec(),
                data: data.to_vec(),
            })
        }
        TensorElementType::Float16 => {
            let (shape, data) = value.try_extract_tensor::<f16>()?;
            Ok(FloatTensor {
                shape: shape.to_vec(),
                data: data.iter().map(|x| x.to_f32()).collect(),
            })
        }
        other => Err(ort::Error::new(format!(
            "expected a float output, got {other}"
        ))),
    }
}
