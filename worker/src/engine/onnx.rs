//! Just enough of the ONNX protobuf schema to read a model's initializers (its weights).
//! Hand-declared prost messages: prost skips every field not named here, so no `protoc` and no
//! generated code are needed to read a weights-only view of an ONNX file.

use prost::Message;

#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    #[prost(float, repeated, tag = "4")]
    pub float_data: Vec<f32>,
    #[prost(string, tag = "8")]
    pub name: String,
    #[prost(bytes = "vec", tag = "9")]
    pub raw_data: Vec<u8>,
    #[prost(int32, tag = "14")]
    pub data_location: i32,
}

/// ONNX's TensorProto.DataType.FLOAT.
const FLOAT: i32 = 1;
/// ONNX's TensorProto.DataLocation.EXTERNAL.
const EXTERNAL: i32 = 1;

/// A float initializer: its name, shape and values.
pub struct Initializer {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Decodes an ONNX model and returns its float initializers. Errors are strings; the caller
/// attaches the file name.
pub fn float_initializers(bytes: &[u8]) -> Result<Vec<Initializer>, String> {
    let model = ModelProto::decode(bytes).map_err(|e| format!("protobuf decode failed: {e}"))?;
    let graph = model.graph.ok_or("the model has no graph")?;
    let mut out = Vec::new();
    for t in graph.initializer {
        if t.data_type != FLOAT {
            continue;
        }
        if t.data_location == EXTERNAL {
            return Err(format!("initializer {} is stored in an external file, which is not supported; re-export with the weights embedded", t.name));
        }
        let shape: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
        let count: usize = shape.iter().product();
        let values: Vec<f32> = if !t.raw_data.is_empty() {
            if t.raw_data.len() != count * 4 {
                return Err(format!(
                    "initializer {} has {} bytes of data for shape {:?} (expected {})",
                    t.name,
                    t.raw_data.len(),
                    shape,
                    count * 4
                ));
            }
            t.raw_data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        } else {
            t.float_data
        };
        if values.len() != count {
            return Err(format!(
                "initializer {} has {} values for shape {:?}",
                t.name,
                values.len(),
                shape
            ));
        }
        out.push(Initializer {
            name: t.name,
            shape,
            values,
        });
    }
    Ok(out)
}
