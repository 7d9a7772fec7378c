//! Conversions between the engine's `f32`/`i64` buffers and ONNX Runtime values of whatever
//! element type a graph declares (float32 or float16 for floats; int64 or int32 for integers).

use half::f16;
use half::slice::HalfFloatSliceExt;
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
            // The slice conversion uses the CPU's F16C instructions where it has them (same
            // round-to-nearest-even result as the scalar one, several times faster).
            let mut v = vec![f16::ZERO; data.len()];
            v.convert_from_f32_slice(data);
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
            let mut out = vec![0.0f32; data.len()];
            data.convert_to_f32_slice(&mut out);
            Ok(FloatTensor {
                shape: shape.to_vec(),
                data: out,
            })
        }
        other => Err(ort::Error::new(format!(
            "expected a float output, got {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slice conversions (F16C where the CPU has it) must give the bits the scalar ones give.
    #[test]
    fn float16_slice_conversions_match_the_scalar_ones() {
        crate::engine::runtime::environment().expect("ONNX Runtime (scripts/setup-ort.sh)");
        let mut data: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.1,
            65504.0,
            65519.0,
            65520.0,
            1e9,
            -1e9,
            6.1e-5,
            5.96e-8,
            2.98e-8,
            1e-10,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1.000_488_3,
            1.000_976_6,
        ];
        // Odd lengths and values across the whole range, ties to even included.
        data.extend((0..1001).map(|i| ((i as f32) * 0.377).sin() * 10f32.powi(i % 9 - 4)));
        let value = float_value(TensorElementType::Float16, &[data.len() as i64], &data).unwrap();
        let (_, halves) = value.try_extract_tensor::<f16>().unwrap();
        let scalar: Vec<u16> = data.iter().map(|&x| f16::from_f32(x).to_bits()).collect();
        let sliced: Vec<u16> = halves.iter().map(|h| h.to_bits()).collect();
        assert_eq!(sliced, scalar);
        let back = to_f32(&value).unwrap();
        let scalar_back: Vec<u32> = halves.iter().map(|h| h.to_f32().to_bits()).collect();
        let sliced_back: Vec<u32> = back.data.iter().map(|x| x.to_bits()).collect();
        assert_eq!(sliced_back, scalar_back);
        assert_eq!(back.shape, vec![data.len() as i64]);
    }
}
