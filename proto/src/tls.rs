//! TLS for the coordinator's port (rustls, through tonic): the coordinator presents a
//! certificate and key from PEM files; workers check it against a CA they are given (or the
//! system's roots). The token still decides who may call; TLS keeps it and the images private
//! on the way.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Reads a PEM file and checks it holds at least one block of the expected kind, so that a
/// swapped or truncated file is named before any connection is tried.
fn pem(path: &Path, flag: &str, kind: &str) -> Result<Vec<u8>, String> {
    let bytes =
        std::fs::read(path).map_err(|e| format!("cannot read {flag} {}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{kind}-----")));
    if !found {
        return Err(format!(
            "{flag} {} holds no PEM {kind}; expected a block starting `-----BEGIN ...{kind}-----`",
            path.display()
        ));
    }
    Ok(bytes)
}

/// The coordinator's side: its certificate chain and private key, both PEM.
pub fn server(cert: &Path, key: &Path) -> Result<ServerTlsConfig, String> {
    let cert = pem(cert, "--tls-cert", "CERTIFICATE")?;
    let key = pem(key, "--tls-key", "PRIVATE KEY")?;
    Ok(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
}

/// A worker's side: trust the CA in `ca` (PEM), or the system's roots without one; `domain`
/// replaces the host of the address as the name the certificate must carry.
pub fn client(ca: Option<&Path>, domain: Option<&str>) -> Result<ClientTlsConfig, String> {
    let mut config = match ca {
        Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem(
            ca,
            "--tls-ca",
            "CERTIFICATE",
        )?)),
        None => ClientTlsConfig::new().with_native_roots(),
    };
    if let Some(d) = domain {
        config = config.domain_name(d);
    }
    Ok(config)
}

/// Whether a connection error (with its sources) is the peer's certificate being refused:
/// retrying cannot fix that, so a worker stops and says what to give it.
pub fn is_certificate_error(chain: &str) -> bool {
    chain.contains("certificate")
}

/// An error and all its sources on one line: tonic's own message is often just "transport
/// error", and the cause (refused, reset, certificate) is further down.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let m = s.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        next = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_given_as_certificate_is_named() {
        let dir = std::env::temp_dir().join(format!("vgg-atlas-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key.pem");
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = server(&key, &key).unwrap_err();
        assert!(
            err.contains("--tls-cert") && err.contains("holds no PEM CERTIFICATE"),
            "{err}"
        );
        let err = client(Some(&dir.join("missing.pem")), None).unwrap_err();
        assert!(err.contains("cannot read --tls-ca"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
