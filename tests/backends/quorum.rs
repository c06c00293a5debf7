//! Quorum events with QEMU's fields, through an image: `QUORUM_REPORT_BAD` names
//! the child by its node name, `QUORUM_FAILURE` names the quorum.

use super::support::*;
use super::{flip, quorum_files};
use qcow2kit::storage::{open_from_options, BackendSpec};
use qcow2kit::{Event, Image, OpenOptions, QuorumOpType};
use std::path::Path;
use std::sync::{Arc, Mutex};

fn spec(d: &Path, extra: &[(&str, &str)]) -> BackendSpec {
    let mut options: Vec<(String, String)> = vec![("vote-threshold".into(), "2".into())];
    for (i, f) in ["A.qcow2", "B.qcow2", "C.qcow2"].iter().enumerate() {
        options.push((format!("children.{i}.driver"), "file".into()));
        options.push((
            format!("children.{i}.filename"),
            d.join(f).display().to_string(),
        ));
    }
    options.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    BackendSpec {
        driver: "quorum".into(),
        options,
    }
}

type Seen = Arc<Mutex<Vec<Event>>>;

fn open(d: &Path, extra: &[(&str, &str)]) -> (Image, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let storage = open_from_options(&spec(d, extra), false).unwrap();
    let opts = OpenOptions::new().on_event(move |e| s.lock().unwrap().push(e.clone()));
    (Image::open_storage(storage, &opts).unwrap(), seen)
}

fn quorum_events(seen: &Seen) -> Vec<Event> {
    std::mem::take(&mut *seen.lock().unwrap())
        .into_iter()
        .filter(|e| {
            matches!(
                e,
                Event::QuorumReportBad { .. } | Event::QuorumFailure { .. }
            )
        })
        .collect()
}

#[test]
fn quorum_report_bad_names_the_child_and_the_request() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    quorum_files(d.path());
    // B's data cluster of guest 0 (host 0x50000) has a flipped byte.
    let (img, seen) = open(d.path(), &[("children.1.node-name", "replica-b")]);
    // Opening reads cluster 0 and the tables, not the data cluster: nothing to report.
    assert_eq!(quorum_events(&seen), []);
    let mut buf = vec![0u8; 65536];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x11));
    let ev = quorum_events(&seen);
    // The guest read of the cluster is one request of 128 sectors at 0x50000.
    assert_eq!(
        ev,
        [Event::QuorumReportBad {
            kind: QuorumOpType::Read,
            error: None,
            node_name: "replica-b".into(),
            sector_num: 0x50000 / 512,
            sectors_count: 128,
        }]
    );
    assert_eq!(
        serde_json::to_value(&ev[0]).unwrap(),
        serde_json::json!({"event": "QUORUM_REPORT_BAD", "data": {
            "type": "read", "node-name": "replica-b",
            "sector-num": 640, "sectors-count": 128}})
    );
    drop(img);

    // Two children differ from each other and from A in one sector: no two agree,
    // the read fails with EIO and QUORUM_FAILURE names the quorum.
    let (img, seen) = open(d.path(), &[("node-name", "q0")]);
    quorum_events(&seen);
    flip(&d.path().join("C.qcow2"), 0x50000 + 101);
    let err = img.read_at(&mut buf, 0).unwrap_err();
    assert!(err.to_string().contains("Input/output error"), "{err}");
    let ev = quorum_events(&seen);
    assert_eq!(
        ev,
        [Event::QuorumFailure {
            reference: "q0".into(),
            sector_num: 640,
            sectors_count: 128,
        }],
    );
    assert_eq!(
        serde_json::to_value(&ev[0]).unwrap(),
        serde_json::json!({"event": "QUORUM_FAILURE", "data": {
            "reference": "q0", "sector-num": 640, "sectors-count": 128}})
    );
}

#[test]
fn quorum_children_get_stable_generated_node_names() {
    let d = scratch();
    let s = qcow2kit::storage::QuorumStorage::open(
        &spec(d.path(), &[("children.2.node-name", "c")]),
        true,
    );
    // The files do not exist: the open fails with the child's message.
    assert!(s.is_err());
    for f in ["A.qcow2", "B.qcow2", "C.qcow2"] {
        std::fs::write(d.path().join(f), [0u8; 512]).unwrap();
    }
    let q = qcow2kit::storage::QuorumStorage::open(
        &spec(d.path(), &[("children.2.node-name", "c")]),
        true,
    )
    .unwrap();
    assert_eq!(
        q.child_node_names(),
        ["#quorum.children.0", "#quorum.children.1", "c"]
    );
    let q = qcow2kit::storage::QuorumStorage::open(&spec(d.path(), &[("node-name", "q")]), true)
        .unwrap();
    assert_eq!(
        q.child_node_names(),
        ["#q.children.0", "#q.children.1", "#q.children.2"]
    );
}
