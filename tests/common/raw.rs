//! gRPC calls with hand-encoded request bytes: what a client that does not
//! use the generated stubs (or a hostile one) can send.

use prost::bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

/// containerd's snapshots service.
pub const SERVICE: &str = "/containerd.services.snapshots.v1.Snapshots";

/// The HTTP/2 path of one of the service's methods.
pub fn path(method: &str) -> String {
    format!("{SERVICE}/{method}")
}

/// [`path`] as the type tonic's client takes.
pub fn method_path(method: &str) -> PathAndQuery {
    PathAndQuery::try_from(path(method)).expect("a valid method path")
}

/// Sends already-encoded protobuf bytes and returns the reply's bytes.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;
pub struct RawEncoder;
pub struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// One unary call of `method` with `body` as the encoded request.
pub async fn unary(
    ch: &Channel,
    method: &str,
    body: Vec<u8>,
) -> Result<tonic::Response<Vec<u8>>, tonic::Status> {
    let mut g = tonic::client::Grpc::new(ch.clone());
    g.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("channel not ready: {e}")))?;
    g.unary(tonic::Request::new(body), method_path(method), RawCodec)
        .await
}
