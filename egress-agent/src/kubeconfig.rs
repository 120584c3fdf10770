//! The cluster's API server name, as the kubelet on this node knows it: the `server:` of
//! its kubeconfig. With it the cloud presets allow that one API server instead of every
//! one in the region (see `presets::expand`).

use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;

/// Where AKS nodes keep the kubelet's kubeconfig.
pub const DEFAULT_KUBECONFIG: &str = "/var/lib/kubelet/kubeconfig";

/// An API server name read from a kubeconfig, and the file it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletApiServer {
    pub name: String,
    pub file: String,
}

#[derive(Deserialize)]
struct Kubeconfig {
    #[serde(default)]
    clusters: Vec<NamedCluster>,
}

#[derive(Deserialize)]
struct NamedCluster {
    cluster: Cluster,
}

#[derive(Deserialize)]
struct Cluster {
    server: String,
}

/// The API server name in the kubeconfig at `path`. `Ok(None)` when there is no such file
/// (not on a node) or its server is an address, which names no API server in particular.
pub fn api_server(path: &Path) -> Result<Option<KubeletApiServer>, String> {
    let file = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{file}: cannot read: {e}")),
    };
    let config: Kubeconfig =
        serde_norway::from_str(&text).map_err(|e| format!("{file}: not a kubeconfig: {e}"))?;
    let mut servers: Vec<&str> = config
        .clusters
        .iter()
        .map(|c| c.cluster.server.as_str())
        .collect();
    servers.dedup();
    let server = match servers[..] {
        [server] => server,
        [] => return Err(format!("{file}: names no cluster `server`")),
        _ => {
            return Err(format!(
                "{file}: names more than one cluster `server` ({}); the kubelet's names one",
                servers.join(", ")
            ));
        }
    };
    Ok(host(server).map(|name| KubeletApiServer { name, file }))
}

/// The host name in a `server:` URL such as `https://name:443/path`, lowercased; `None`
/// for an address.
fn host(server: &str) -> Option<String> {
    let rest = server.split_once("://").map_or(server, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.starts_with('[') {
        return None;
    }
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    };
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    (!host.is_empty() && host.parse::<IpAddr>().is_err()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kubeconfig file that removes itself.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn new(name: &str, text: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("kubeconfig-test-{}-{name}", std::process::id()));
            std::fs::write(&path, text).expect("write the kubeconfig");
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// The shape of the kubeconfig AKS writes for the kubelet.
    const AKS: &str = "apiVersion: v1
kind: Config
clusters:
- name: localcluster
  cluster:
    certificate-authority: /etc/kubernetes/certs/ca.crt
    server: https://myaks-dns-4f1e2d3c.hcp.eastus.azmk8s.io:443
users:
- name: client
  user:
    client-certificate: /etc/kubernetes/certs/client.crt
contexts:
- context:
    cluster: localcluster
    user: client
  name: localclustercontext
current-context: localclustercontext
";

    #[test]
    fn reads_the_server_name() {
        let file = TempFile::new("aks", AKS);
        let server = api_server(&file.0).expect("valid").expect("a name");
        assert_eq!(server.name, "myaks-dns-4f1e2d3c.hcp.eastus.azmk8s.io");
        assert_eq!(server.file, file.0.display().to_string());
    }

    #[test]
    fn no_file_is_no_name() {
        let path = std::env::temp_dir().join("kubeconfig-test-does-not-exist");
        assert_eq!(api_server(&path), Ok(None));
    }

    #[test]
    fn an_address_names_no_api_server() {
        for server in [
            "https://203.0.113.5:443",
            "https://[2001:db8::1]:443",
            "203.0.113.5",
        ] {
            assert_eq!(host(server), None, "{server}");
        }
    }

    #[test]
    fn hosts_of_server_urls() {
        for (server, name) in [
            (
                "https://a.hcp.eastus.azmk8s.io:443",
                "a.hcp.eastus.azmk8s.io",
            ),
            ("https://A.HCP.EastUS.azmk8s.io.", "a.hcp.eastus.azmk8s.io"),
            (
                "https://a.b.privatelink.eastus.azmk8s.io/path",
                "a.b.privatelink.eastus.azmk8s.io",
            ),
            ("a.hcp.eastus.azmk8s.io:443", "a.hcp.eastus.azmk8s.io"),
        ] {
            assert_eq!(host(server).as_deref(), Some(name), "{server}");
        }
    }

    #[test]
    fn two_servers_or_none_are_refused() {
        let two = TempFile::new(
            "two",
            "clusters:\n- cluster: {server: 'https://a.hcp.eastus.azmk8s.io'}\n- cluster: {server: 'https://b.hcp.eastus.azmk8s.io'}\n",
        );
        let message = api_server(&two.0).expect_err("refused");
        assert!(
            message.contains("more than one cluster `server`"),
            "{message}"
        );
        let none = TempFile::new("none", "kind: Config\n");
        let message = api_server(&none.0).expect_err("refused");
        assert!(message.ends_with("names no cluster `server`"), "{message}");
        let bad = TempFile::new("bad", "clusters: 3\n");
        let message = api_server(&bad.0).expect_err("refused");
        assert!(message.contains("not a kubeconfig"), "{message}");
    }
}
