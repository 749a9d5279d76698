//! Who may talk to a coordinator: a shared token, sent by workers as `authorization: Bearer
//! <token>` on every call and compared by the coordinator in constant time.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::CoordinatorClient;

/// The metadata key the token travels in.
pub const HEADER: &str = "authorization";

/// Shorter tokens are refused: they could be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

/// Checks a token before anything uses it: long enough, and sendable as a gRPC header.
pub fn check_token(token: &str) -> Result<(), String> {
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "the token is {} characters; use at least {MIN_TOKEN_LEN} (e.g. `openssl rand -hex 32`)",
            token.len()
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token must be printable ASCII without spaces".into());
    }
    Ok(())
}

/// Client side: adds the token to every request.
#[derive(Clone)]
pub struct AttachToken(Option<MetadataValue<Ascii>>);

impl AttachToken {
    pub fn new(token: Option<&str>) -> Result<AttachToken, String> {
        token
            .map(|t| {
                check_token(t)?;
                format!("Bearer {t}")
                    .parse()
                    .map_err(|e| format!("the token cannot be sent as a header: {e}"))
            })
            .transpose()
            .map(AttachToken)
    }
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert(HEADER, v.clone());
        }
        Ok(req)
    }
}

/// A coordinator client that sends the token.
pub type Client = CoordinatorClient<InterceptedService<Channel, AttachToken>>;

pub fn client(channel: Channel, token: AttachToken) -> Client {
    CoordinatorClient::with_interceptor(channel, token)
        .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::MAX_MESSAGE_BYTES)
}

/// Server side: refuses every call without the right token (`None`: no token required).
#[derive(Clone)]
pub struct CheckToken(Option<Arc<[u8]>>);

impl CheckToken {
    pub fn new(token: Option<&str>) -> Result<CheckToken, String> {
        if let Some(t) = token {
            check_token(t)?;
        }
        Ok(CheckToken(token.map(|t| Arc::from(t.as_bytes()))))
    }
}

impl Interceptor for CheckToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.0 else {
            return Ok(req);
        };
        let given = req
            .metadata()
            .get(HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(g) if bool::from(g.as_bytes().ct_eq(expected)) => Ok(req),
            Some(_) => Err(Status::unauthenticated(
                "wrong token: give this worker the coordinator's token (--token or VGG_ATLAS_TOKEN)",
            )),
            None => Err(Status::unauthenticated(
                "this coordinator requires a token: give the worker --token or VGG_ATLAS_TOKEN",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(header: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(h) = header {
            r.metadata_mut().insert(HEADER, h.parse().unwrap());
        }
        r
    }

    #[test]
    fn only_the_right_token_passes() {
        let token = "0123456789abcdef-secret";
        let mut check = CheckToken::new(Some(token)).unwrap();
        assert!(check
            .call(request(Some(&format!("Bearer {token}"))))
            .is_ok());
        let wrong = check
            .call(request(Some("Bearer 0123456789abcdef-secreT")))
            .unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(wrong.message().contains("wrong token"));
        let missing = check.call(request(None)).unwrap_err();
        assert!(missing.message().contains("requires a token"));
        assert!(
            check.call(request(Some(token))).is_err(),
            "without the Bearer scheme"
        );
        assert!(check.call(request(Some("Bearer "))).is_err());
        // No token configured: everything passes.
        assert!(CheckToken::new(None).unwrap().call(request(None)).is_ok());
    }

    #[test]
    fn the_client_attaches_what_the_server_checks() {
        let token = "a-long-enough-token-1234";
        let mut attach = AttachToken::new(Some(token)).unwrap();
        let req = attach.call(Request::new(())).unwrap();
        assert!(CheckToken::new(Some(token)).unwrap().call(req).is_ok());
    }

    #[test]
    fn weak_tokens_are_refused() {
        assert!(check_token("short").unwrap_err().contains("at least 16"));
        assert!(check_token("has a space in it, long").is_err());
        assert!(AttachToken::new(Some("tiny")).is_err());
        assert!(CheckToken::new(Some("tiny")).is_err());
    }
}
