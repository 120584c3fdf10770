use super::*;
use crate::pin::temp::TempRoot;

fn attached<'a>(interfaces: &'a [String], on_exit: OnExit) -> Attached<'a> {
    Attached {
        mode: Mode::Enforce,
        rules: 1,
        cidr_entries: 2,
        cgroup: Path::new("/sys/fs/cgroup/unified/egress-test"),
        interfaces,
        workload_interfaces: &[],
        on_exit,
    }
}

#[test]
fn the_attached_line_names_the_mode_the_policy_cgroup_interfaces_and_the_exit() {
    assert_eq!(
        attached(&[], OnExit::Detach).line(),
        "attached: mode enforce, 1 rule (2 CIDR entries), cgroup \
         /sys/fs/cgroup/unified/egress-test; on exit: detach"
    );
    let uplinks = ["eth0".to_owned(), "eth1".to_owned()];
    assert_eq!(
        attached(&uplinks, OnExit::Keep).line(),
        "attached: mode enforce, 1 rule (2 CIDR entries), cgroup \
         /sys/fs/cgroup/unified/egress-test, interfaces eth0,eth1; on exit: keep enforcing"
    );
}

#[test]
fn the_attached_event_says_the_same() {
    let uplinks = ["eth0".to_owned()];
    let workloads = ["cali1".to_owned(), "cali2".to_owned()];
    let event = Attached {
        mode: Mode::Audit,
        workload_interfaces: &workloads,
        ..attached(&uplinks, OnExit::Keep)
    }
    .event();
    assert_eq!(
        event,
        json!({
            "mode": "audit",
            "rules": 1,
            "cidr_entries": 2,
            "cgroup": "/sys/fs/cgroup/unified/egress-test",
            "interfaces": ["eth0"],
            "workload_interfaces": ["cali1", "cali2"],
            "on_exit": "keep",
        })
    );
    assert_eq!(attached(&[], OnExit::Detach).event()["on_exit"], "detach");
}

#[test]
fn took_over_lists_the_maps_replaced_and_what_was_carried_over() {
    let replaced = [
        Replacement {
            map: "LEARNED",
            why: "max_entries 1024, wanted 4096".into(),
            carried: 3,
        },
        Replacement {
            map: "DNS_EVENTS",
            why: "max_entries 4096, wanted 8192".into(),
            carried: 0,
        },
    ];
    let event = took_over(Path::new("/sys/fs/bpf/egress/v1"), 5, 2, 4, &replaced);
    assert_eq!(
        event,
        json!({
            "pin_dir": "/sys/fs/bpf/egress/v1",
            "learned": 5,
            "legacy_port_sets": 2,
            "attachments_replaced": 4,
            "replaced_maps": [
                {"map": "LEARNED", "why": "max_entries 1024, wanted 4096", "carried": 3},
                {"map": "DNS_EVENTS", "why": "max_entries 4096, wanted 8192", "carried": 0},
            ],
        })
    );
    assert_eq!(
        took_over(Path::new("/p"), 0, 0, 0, &[])["replaced_maps"],
        json!([])
    );
}

#[test]
fn a_task_that_ends_early_says_whether_it_stopped_or_failed() {
    assert_eq!(
        task_failure("the policy watcher", Ok(Ok(()))).to_string(),
        "the policy watcher stopped"
    );
    let failed = task_failure("the event reader", Ok(Err(anyhow::anyhow!("EPIPE"))));
    assert_eq!(format!("{failed:#}"), "the event reader failed: EPIPE");
}

#[tokio::test]
async fn a_task_that_panicked_says_so() {
    let joined = tokio::spawn(async { panic!("a bug") }).await;
    let failure = task_failure("the metrics server", joined.map(|()| Ok(())));
    assert_eq!(failure.to_string(), "the metrics server panicked");
}

#[test]
fn a_directory_that_is_not_a_cgroup_is_refused_before_anything_is_attached() {
    let dir = std::env::temp_dir();
    let error = check_inputs(&dir, Path::new("/sys/fs/cgroup"), &[]).expect_err("refused");
    assert_eq!(
        error.to_string(),
        format!(
            "--cgroup {}: not a cgroup v2 directory (the cgroup2 hierarchy is mounted on \
             /sys/fs/cgroup)",
            dir.display()
        )
    );
}

#[test]
fn points_name_the_attach_points() {
    let links = [
        LinkPin {
            path: "/p/v1/links/cgroup-7-egress@3".into(),
            point: "cgroup-7-egress".into(),
        },
        LinkPin {
            path: "/p/v1/links/tc-eth0-ingress@4".into(),
            point: "tc-eth0-ingress".into(),
        },
    ];
    assert_eq!(points(&links), "cgroup-7-egress, tc-eth0-ingress");
}

/// `undo_start`'s message after a failed start that found `before` and added `added`.
fn undo(root: &TempRoot, before: &[&str], added: &[&str], on_exit: OnExit) -> String {
    for path in before {
        root.add(path);
    }
    let contents = root.0.contents().expect("readable");
    for path in added {
        root.add(path);
    }
    format!(
        "{:#}",
        undo_start(anyhow::anyhow!("boom"), &root.0, &contents, on_exit)
    )
}

#[test]
fn a_failed_first_start_with_detach_removes_what_it_pinned() {
    let root = TempRoot::new("undo-first");
    let added = ["v1/maps/CIDRS", "v1/links/cgroup-7-egress@3"];
    assert_eq!(
        undo(&root, &[], &added, OnExit::Detach),
        "the start failed; nothing of it is left attached or pinned: boom"
    );
    assert!(!root.0.root().exists(), "the pin root is removed");
}

#[test]
fn a_failed_start_with_detach_leaves_the_predecessor_enforcing() {
    let root = TempRoot::new("undo-predecessor");
    let before = ["v1/maps/CIDRS", "v1/links/cgroup-7-egress@3"];
    let message = undo(
        &root,
        &before,
        &["v1/links/cgroup-7-egress@9"],
        OnExit::Detach,
    );
    assert_eq!(
        message,
        format!(
            "the start failed; left: the previous agent's pinned state in {}, enforcing \
             through its attachments cgroup-7-egress: boom",
            root.0.root().display()
        )
    );
    assert!(root.0.root().join(before[1]).exists());
    assert!(!root.0.root().join("v1/links/cgroup-7-egress@9").exists());
}

#[test]
fn a_failed_start_with_keep_says_which_attachments_it_kept() {
    let root = TempRoot::new("undo-keep");
    let message = undo(
        &root,
        &["v1/maps/CIDRS"],
        &["v1/links/cgroup-7-egress@9"],
        OnExit::Keep,
    );
    assert_eq!(
        message,
        format!(
            "the start failed; left: this agent's attachments, kept by --on-exit keep: \
             cgroup-7-egress; what a previous agent left pinned in {} (no attachments): boom",
            root.0.root().display()
        )
    );
    assert!(root.0.root().join("v1/links/cgroup-7-egress@9").exists());
}
