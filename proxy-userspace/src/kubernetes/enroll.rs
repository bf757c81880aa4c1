//! Which of this node's pods are captured, and enrolling their network namespaces.
//!
//! A pod is captured when it runs on this node, is not host-network, not finished, carries no
//! Istio sidecar, and it or its namespace has `istio.io/dataplane-mode=ambient` — unless the pod
//! opts out with `istio.io/dataplane-mode=none` (Istio ambient's labels, so a namespace already
//! in Istio's ambient mesh needs no change). Without a CNI plugin the pod's network namespace is
//! found from its processes (hostPID): a process whose cgroup path names the pod's uid
//! (`pod<uid>` with cgroupfs, `pod<uid_with_underscores>` with the systemd driver) and whose
//! namespace holds the pod's IP. Every enrollment is keyed by the pod's uid, so a deleted,
//! finished or opted-out pod is unenrolled and pod churn leaves nothing behind in the kernel.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{KubePod, Object};

use super::Store;

/// The label Istio ambient uses to put a namespace or pod into the mesh.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// The annotation the sidecar injector sets on pods that have a sidecar.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";

/// Whether a pod is captured, and why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Enroll the pod's network namespace.
    Capture,
    /// Leave it alone, for this reason.
    Skip(&'static str),
}

/// Decide for one pod, given its namespace's labels and this node's name.
pub fn decide(
    pod: &Object<KubePod>,
    namespace_labels: Option<&BTreeMap<String, String>>,
    node: &str,
) -> Decision {
    if pod.spec.spec.node_name.as_deref() != Some(node) {
        return Decision::Skip("runs on another node");
    }
    if pod.spec.spec.host_network == Some(true) {
        return Decision::Skip("hostNetwork pod");
    }
    if pod.spec.is_terminal() {
        return Decision::Skip("pod has finished");
    }
    let pod_mode = pod.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str);
    if pod_mode == Some("none") {
        return Decision::Skip("pod opted out (istio.io/dataplane-mode=none)");
    }
    if pod.annotations.contains_key(SIDECAR_STATUS_ANNOTATION) {
        return Decision::Skip("pod has an Istio sidecar");
    }
    let ns_mode = namespace_labels
        .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
        .map(String::as_str);
    if pod_mode == Some("ambient") || ns_mode == Some("ambient") {
        Decision::Capture
    } else {
        Decision::Skip("not in the mesh (no istio.io/dataplane-mode=ambient)")
    }
}

/// Adds and removes network namespaces from capture (the eBPF data path, or a test double).
pub trait Enroller: Send + Sync {
    /// Enroll the namespace at `netns` under `key`; returns its cookie.
    fn enroll(&self, key: &Path, netns: &Path) -> Result<u64, String>;
    /// Remove the namespace enrolled under `key`; `false` if there was none.
    fn unenroll(&self, key: &Path) -> Result<bool, String>;
}

impl Enroller for crate::dataplane::Kernel {
    fn enroll(&self, key: &Path, netns: &Path) -> Result<u64, String> {
        self.enroll_as(key, netns).map_err(|e| e.to_string())
    }

    fn unenroll(&self, key: &Path) -> Result<bool, String> {
        crate::dataplane::Kernel::unenroll(self, key).map_err(|e| e.to_string())
    }
}

/// Finds a pod's network namespace.
pub trait NetnsLocator: Send {
    /// A path to the network namespace of the pod with this uid holding one of `ips`.
    fn locate(&self, uid: &str, ips: &[IpAddr]) -> Option<PathBuf>;
}

/// Finds pods' namespaces from `/proc` (the host's, with hostPID).
#[derive(Debug, Clone)]
pub struct ProcLocator {
    /// The proc filesystem to scan (`/proc`).
    pub proc_root: PathBuf,
    /// Confirm the candidate namespace holds the pod's IP (needs CAP_SYS_ADMIN for setns).
    pub check_ips: bool,
}

impl ProcLocator {
    /// Scan the host's `/proc`, confirming IPs.
    pub fn host() -> Self {
        ProcLocator {
            proc_root: PathBuf::from("/proc"),
            check_ips: true,
        }
    }
}

/// Does a `/proc/<pid>/cgroup` text put the process in the pod with this uid?
pub fn cgroup_names_pod(cgroup: &str, uid: &str) -> bool {
    if uid.is_empty() {
        return false;
    }
    let dashed = format!("pod{uid}");
    let underscored = format!("pod{}", uid.replace('-', "_"));
    cgroup.lines().any(|line| {
        let path = line.rsplit(':').next().unwrap_or(line);
        path.split('/')
            .any(|seg| seg == dashed || seg.contains(&format!("-{underscored}.slice")))
    })
}

impl NetnsLocator for ProcLocator {
    fn locate(&self, uid: &str, ips: &[IpAddr]) -> Option<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        let own = std::fs::metadata(self.proc_root.join("self/ns/net"))
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let entries = std::fs::read_dir(&self.proc_root).ok()?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let dir = entry.path();
            let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup")) else {
                continue; // the process exited
            };
            if !cgroup_names_pod(&cgroup, uid) {
                continue;
            }
            let netns = dir.join("ns/net");
            let Ok(meta) = std::fs::metadata(&netns) else {
                continue;
            };
            if Some((meta.dev(), meta.ino())) == own {
                continue; // host network namespace: never capture the node itself
            }
            if self.check_ips && !crate::dataplane::netns::holds_any(&netns, ips).unwrap_or(false) {
                continue;
            }
            return Some(netns);
        }
        None
    }
}

/// A pod whose namespace is enrolled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    /// `namespace/name`.
    pub pod: String,
    /// The key it is enrolled under.
    pub key: PathBuf,
    /// The namespace path it was found at.
    pub netns: PathBuf,
}

/// Keeps the enrolled set equal to the pods [`decide`] captures.
pub struct Enrollment {
    node: String,
    enroller: Arc<dyn Enroller>,
    locator: Box<dyn NetnsLocator>,
    enrolled: BTreeMap<String, Enrolled>,
}

impl Enrollment {
    /// Enrollment for the pods of `node`.
    pub fn new(node: String, enroller: Arc<dyn Enroller>, locator: Box<dyn NetnsLocator>) -> Self {
        Enrollment {
            node,
            enroller,
            locator,
            enrolled: BTreeMap::new(),
        }
    }

    /// Enrolled pods by uid.
    pub fn enrolled(&self) -> &BTreeMap<String, Enrolled> {
        &self.enrolled
    }

    /// Enroll pods that should be captured and are not yet (when their namespace is found),
    /// unenroll the ones that should not be (deleted, finished, opted out, namespace unlabeled).
    pub fn reconcile(&mut self, store: &Store) {
        let mut wanted: BTreeMap<String, &Object<KubePod>> = BTreeMap::new();
        for pod in store.pods() {
            let uid = pod.uid.clone().unwrap_or_default();
            if uid.is_empty() {
                continue;
            }
            if decide(pod, store.namespace_labels(&pod.namespace), &self.node) == Decision::Capture
            {
                wanted.insert(uid, pod);
            }
        }
        let gone: Vec<String> = self
            .enrolled
            .keys()
            .filter(|uid| !wanted.contains_key(*uid))
            .cloned()
            .collect();
        for uid in gone {
            let e = self.enrolled.remove(&uid).expect("listed above");
            match self.enroller.unenroll(&e.key) {
                Ok(_) => tracing::info!(pod = %e.pod, "pod left capture"),
                Err(err) => tracing::error!(pod = %e.pod, error = %err, "unenroll failed"),
            }
        }
        for (uid, pod) in wanted {
            if self.enrolled.contains_key(&uid) {
                continue;
            }
            let ips = pod.spec.ips();
            if ips.is_empty() {
                continue; // no sandbox yet
            }
            let Some(netns) = self.locator.locate(&uid, &ips) else {
                tracing::debug!(pod = %pod.name, "network namespace not found yet");
                continue;
            };
            let name = format!("{}/{}", pod.namespace, pod.name);
            let key = PathBuf::from(format!("pod/{name}/{uid}"));
            match self.enroller.enroll(&key, &netns) {
                Ok(cookie) => {
                    tracing::info!(pod = %name, netns = %netns.display(), cookie, "pod captured");
                    self.enrolled.insert(
                        uid,
                        Enrolled {
                            pod: name,
                            key,
                            netns,
                        },
                    );
                }
                Err(err) => tracing::error!(pod = %name, error = %err, "enroll failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "7e1f0000-0001-4b2c-9d3e-000000000011";

    #[test]
    fn cgroup_paths_of_both_drivers_name_the_pod() {
        let systemd = "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod7e1f0000_0001_4b2c_9d3e_000000000011.slice/cri-containerd-ab12.scope\n";
        let cgroupfs = "0::/kubepods/besteffort/pod7e1f0000-0001-4b2c-9d3e-000000000011/ab12\n";
        let guaranteed = "0::/kubepods.slice/kubepods-pod7e1f0000_0001_4b2c_9d3e_000000000011.slice/cri-containerd-ab12.scope\n";
        for text in [systemd, cgroupfs, guaranteed] {
            assert!(cgroup_names_pod(text, UID), "{text}");
        }
        let other = "0::/kubepods/besteffort/pod7e1f0000-0001-4b2c-9d3e-000000000012/ab12\n";
        assert!(!cgroup_names_pod(other, UID));
        assert!(!cgroup_names_pod(
            "0::/system.slice/containerd.service\n",
            UID
        ));
        assert!(!cgroup_names_pod(cgroupfs, ""));
    }

    #[test]
    fn proc_locator_finds_the_pod_process_not_the_host() {
        let root = std::env::temp_dir().join(format!("np-proc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let mk = |pid: &str, cgroup: &str| {
            let d = root.join(pid);
            std::fs::create_dir_all(d.join("ns")).unwrap();
            std::fs::write(d.join("cgroup"), cgroup).unwrap();
            std::fs::write(d.join("ns/net"), pid).unwrap();
        };
        std::fs::create_dir_all(root.join("self/ns")).unwrap();
        std::fs::write(root.join("self/ns/net"), "host").unwrap();
        mk("1", "0::/init.scope\n");
        mk(
            "4242",
            "0::/kubepods/burstable/pod7e1f0000-0001-4b2c-9d3e-000000000011/c1\n",
        );
        mk("77", "0::/kubepods/burstable/podother/c2\n");
        let loc = ProcLocator {
            proc_root: root.clone(),
            check_ips: false,
        };
        assert_eq!(loc.locate(UID, &[]), Some(root.join("4242/ns/net")));
        assert_eq!(loc.locate("absent", &[]), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
