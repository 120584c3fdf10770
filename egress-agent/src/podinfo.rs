//! Which Kubernetes workload a cgroup is, found on the node without the API server: the
//! kubelet names a container's cgroup by its pod's UID and the container's ID, and names
//! its log files by namespace, pod and container.
//!
//! Cgroup paths (relative to the cgroup2 mount):
//! - systemd driver: `/kubepods.slice/kubepods-burstable.slice/
//!   kubepods-burstable-pod<uid, '-' as '_'>.slice/cri-containerd-<id>.scope` (CRI-O:
//!   `crio-<id>.scope`);
//! - cgroupfs driver: `/kubepods/burstable/pod<uid>/<id>` (CRI-O: `crio-<id>`);
//! - either, nested below the cgroup of a node that runs in a container.
//!
//! Log layout under the logs root (`/var/log` by default):
//! `pods/<namespace>_<pod>_<uid>/<container>/` and
//! `containers/<pod>_<namespace>_<container>-<id>.log`.
use std::{collections::HashMap, fs, path::PathBuf};

use serde_json::Value;

/// The default root of the kubelet's log layout.
pub const DEFAULT_POD_LOGS: &str = "/var/log";

/// A pod UID and, when the cgroup is a container's, its container ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    pub uid: String,
    pub container_id: Option<String>,
}

/// Reads a cgroup path (relative to the mount, `/`-separated) as a pod's; `None` for a
/// cgroup outside the kubelet's pods hierarchy.
pub fn parse_cgroup(path: &str) -> Option<PodCgroup> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    // Below the node's root (`/kubepods...`) or nested (`/kubelet.slice/kubelet-kubepods.slice`
    // on kind, a node in a container).
    let top = parts
        .iter()
        .position(|p| p.starts_with("kubepods") || p.contains("-kubepods"))?;
    let (at, uid) =
        (parts.iter().enumerate().skip(top + 1)).find_map(|(i, p)| pod_uid(p).map(|u| (i, u)))?;
    let container_id = parts.get(at + 1).and_then(|p| container_id(p));
    Some(PodCgroup { uid, container_id })
}

/// `pod<uid>` (cgroupfs) or `kubepods[-class]-pod<uid with '_'>.slice` (systemd).
fn pod_uid(part: &str) -> Option<String> {
    let uid = match part.strip_suffix(".slice") {
        Some(slice) => slice.rsplit_once("-pod")?.1.replace('_', "-"),
        None => part.strip_prefix("pod")?.to_owned(),
    };
    let valid = uid.len() >= 8 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    valid.then_some(uid)
}

/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`, `crio-<id>` or a
/// bare `<id>`: 64 hex digits.
fn container_id(part: &str) -> Option<String> {
    let part = part.strip_suffix(".scope").unwrap_or(part);
    let id = ["cri-containerd-", "crio-", "docker-"]
        .iter()
        .find_map(|prefix| part.strip_prefix(prefix))
        .unwrap_or(part);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
}

/// A workload's names, as the kubelet's log layout gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub pod: String,
    pub container: Option<String>,
}

/// Finds workloads' names under a log root, remembering what it found (a pod's names do
/// not change; one not found is looked for again on its next event).
pub struct PodLogs {
    root: PathBuf,
    known: HashMap<(String, Option<String>), Workload>,
}

/// Workloads remembered at most; past that the memory is cleared.
const MAX_KNOWN: usize = 4096;

impl PodLogs {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            known: HashMap::new(),
        }
    }

    /// The workload of a pod cgroup, when the log layout names it.
    pub fn workload(&mut self, pod: &PodCgroup) -> Option<Workload> {
        let key = (pod.uid.clone(), pod.container_id.clone());
        if let Some(w) = self.known.get(&key) {
            return Some(w.clone());
        }
        let found = self.find(pod)?;
        if self.known.len() >= MAX_KNOWN {
            self.known.clear();
        }
        self.known.insert(key, found.clone());
        Some(found)
    }

    fn find(&self, pod: &PodCgroup) -> Option<Workload> {
        let suffix = format!("_{}", pod.uid);
        let dir = fs::read_dir(self.root.join("pods"))
            .ok()?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|name| name.ends_with(&suffix))?;
        let (namespace, pod_name) = dir.strip_suffix(&suffix)?.split_once('_')?;
        let container = pod.container_id.as_ref().and_then(|id| {
            let prefix = format!("{pod_name}_{namespace}_");
            let tail = format!("-{id}.log");
            fs::read_dir(self.root.join("containers"))
                .ok()?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .find_map(|f| Some(f.strip_prefix(&prefix)?.strip_suffix(&tail)?.to_owned()))
        });
        Some(Workload {
            namespace: namespace.to_owned(),
            pod: pod_name.to_owned(),
            container,
        })
    }

    /// Adds `namespace`, `pod` and `container` (or `pod_uid` when the logs do not name the
    /// pod) to an event whose `cgroup` is a pod's.
    pub fn annotate(&mut self, line: &mut Value) {
        let Some(pod) = line["cgroup"].as_str().and_then(parse_cgroup) else {
            return;
        };
        match self.workload(&pod) {
            Some(w) => {
                line["namespace"] = w.namespace.into();
                line["pod"] = w.pod.into();
                if let Some(c) = w.container {
                    line["container"] = c.into();
                }
            }
            None => line["pod_uid"] = pod.uid.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const UID: &str = "0f3c9a2e-7b1d-4c55-9e0a-1234567890ab";
    const ID: &str = "4e5b6c7d8e9f00112233445566778899aabbccddeeff00112233445566778899";

    #[test]
    fn systemd_and_cgroupfs_paths_with_containerd_and_crio_names() {
        let under = UID.replace('-', "_");
        let want = Some(PodCgroup {
            uid: UID.into(),
            container_id: Some(ID.into()),
        });
        for path in [
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{under}.slice/cri-containerd-{ID}.scope"
            ),
            format!("/kubepods.slice/kubepods-pod{under}.slice/crio-{ID}.scope"),
            format!("/kubepods/besteffort/pod{UID}/{ID}"),
            format!("/kubepods/pod{UID}/crio-{ID}"),
            format!("/egress-test-1/kubepods/burstable/pod{UID}/{ID}"),
            format!(
                "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{under}.slice/cri-containerd-{ID}.scope"
            ),
        ] {
            assert_eq!(parse_cgroup(&path), want, "{path}");
        }
        assert_eq!(
            parse_cgroup(&format!("/kubepods/pod{UID}")),
            Some(PodCgroup {
                uid: UID.into(),
                container_id: None
            })
        );
        for host in [
            "/system.slice/sshd.service",
            "/",
            "/kubepods.slice",
            "/user.slice/pod123",
        ] {
            assert_eq!(parse_cgroup(host), None, "{host}");
        }
    }

    #[test]
    fn names_come_from_the_log_layout() {
        let root = std::env::temp_dir().join(format!("egress-podlogs-{}", std::process::id()));
        fs::create_dir_all(root.join(format!("pods/shop_web-7d9f_{UID}/nginx"))).unwrap();
        fs::create_dir_all(root.join("containers")).unwrap();
        fs::write(
            root.join(format!("containers/web-7d9f_shop_nginx-{ID}.log")),
            "",
        )
        .unwrap();
        let mut logs = PodLogs::new(root.clone());
        let mut line = json!({"cgroup": format!("/kubepods/burstable/pod{UID}/{ID}")});
        logs.annotate(&mut line);
        assert_eq!(
            (&line["namespace"], &line["pod"], &line["container"]),
            (&json!("shop"), &json!("web-7d9f"), &json!("nginx"))
        );
        let mut unknown = json!({"cgroup": "/kubepods/pod0000aaaa-0000-0000-0000-000000000000"});
        logs.annotate(&mut unknown);
        assert_eq!(unknown["pod_uid"], "0000aaaa-0000-0000-0000-000000000000");
        assert!(unknown.get("pod").is_none());
        let mut host = json!({"cgroup": "/system.slice/kubelet.service"});
        logs.annotate(&mut host);
        assert_eq!(host, json!({"cgroup": "/system.slice/kubelet.service"}));
        fs::remove_dir_all(&root).unwrap();
    }
}
