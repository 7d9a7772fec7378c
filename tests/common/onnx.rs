//! A minimal ONNX model writer for tests: graphs of `Identity` nodes with chosen input names,
//! element types and shapes, to stand in for a pipeline graph with an altered signature.

/// ONNX element type codes.
pub const FLOAT: i64 = 1;
pub const INT32: i64 = 6;
pub const INT64: i64 = 7;
pub const FLOAT16: i64 = 10;

/// A dimension: fixed size or a named dynamic axis.
#[derive(Clone, Copy)]
pub enum Dim {
    Fixed(i64),
    Dynamic(&'static str),
}

/// A declared graph input or output.
pub struct Io {
    pub name: &'static str,
    pub elem: i64,
    pub shape: Vec<Dim>,
}

pub fn io(name: &'static str, elem: i64, shape: &[Dim]) -> Io {
    Io {
        name,
        elem,
        shape: shape.to_vec(),
    }
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn int_field(field: u32, v: i64, out: &mut Vec<u8>) {
    varint(u64::from(field << 3), out);
    varint(v as u64, out);
}

fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint(u64::from((field << 3) | 2), out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

fn value_info(io: &Io) -> Vec<u8> {
    let mut shape = Vec::new();
    for d in &io.shape {
        let mut dim = Vec::new();
        match d {
            Dim::Fixed(n) => int_field(1, *n, &mut dim),
            Dim::Dynamic(name) => bytes_field(2, name.as_bytes(), &mut dim),
        }
        bytes_field(1, &dim, &mut shape);
    }
    let mut tensor = Vec::new();
    int_field(1, io.elem, &mut tensor);
    bytes_field(2, &shape, &mut tensor);
    let mut ty = Vec::new();
    bytes_field(1, &tensor, &mut ty);
    let mut out = Vec::new();
    bytes_field(1, io.name.as_bytes(), &mut out);
    bytes_field(2, &ty, &mut out);
    out
}

/// A model whose outputs are `Identity` copies of inputs: `links` pairs (input, output).
pub fn identity_model(inputs: &[Io], outputs: &[Io], links: &[(&str, &str)]) -> Vec<u8> {
    let mut graph = Vec::new();
    for (i, (from, to)) in links.iter().enumerate() {
        let mut node = Vec::new();
        bytes_field(1, from.as_bytes(), &mut node);
        bytes_field(2, to.as_bytes(), &mut node);
        bytes_field(3, format!("identity_{i}").as_bytes(), &mut node);
        bytes_field(4, b"Identity", &mut node);
        bytes_field(1, &node, &mut graph);
    }
    bytes_field(2, b"test_graph", &mut graph);
    for i in inputs {
        bytes_field(11, &value_info(i), &mut graph);
    }
    for o in outputs {
        bytes_field(12, &value_info(o), &mut graph);
    }
    let mut opset = Vec::new();
    bytes_field(1, b"", &mut opset);
    int_field(2, 17, &mut opset);
    let mut model = Vec::new();
    int_field(1, 8, &mut model);
    bytes_field(2, b"sdxl-worker-tests", &mut model);
    bytes_field(7, &graph, &mut model);
    bytes_field(8, &opset, &mut model);
    model
}

/// A stand-in UNet: `out_sample = sample`, with the standard SDXL inputs except those in
/// `skip`, and the given element types for `sample`/`out_sample` and `timestep`.
pub fn fake_unet(skip: &[&str], sample_elem: i64, timestep: Io) -> Vec<u8> {
    use Dim::{Dynamic, Fixed};
    let sample_shape = [Dynamic("batch"), Fixed(4), Dynamic("h"), Dynamic("w")];
    let all = vec![
        io("sample", sample_elem, &sample_shape),
        timestep,
        io(
            "encoder_hidden_states",
            FLOAT,
            &[Dynamic("batch"), Dynamic("seq"), Fixed(48)],
        ),
        io("text_embeds", FLOAT, &[Dynamic("batch"), Fixed(32)]),
        io("time_ids", FLOAT, &[Dynamic("batch"), Fixed(6)]),
    ];
    let inputs: Vec<Io> = all
        .into_iter()
        .filter(|i| !skip.contains(&i.name))
        .collect();
    let outputs = [io("out_sample", sample_elem, &sample_shape)];
    identity_model(&inputs, &outputs, &[("sample", "out_sample")])
}
