//! `chainfs info` on a broken chain shows every layer it could open, then
//! the link it could not follow (the locators and the paths tried), and
//! exits with the code of that error, as `vhdiinfo` shows an orphan
//! checkpoint. `--json` keeps the plain array for a complete chain and
//! prints {"layers":[...], "error":{...}} for a broken one.

mod common;

use std::path::Path;

use common::{chainfs, chainfs_ok, code, unpack_fixture};
use serde_json::Value;
use tempfile::TempDir;

fn info(args: &[&str]) -> (i32, String, String) {
    let o = chainfs(args);
    (
        code(&o),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn orphan_checkpoint_shows_its_layer_and_the_missing_parent() {
    let d = TempDir::new().unwrap();
    let img = unpack_fixture("dissect-hypervisor/differencing.avhdx", d.path());

    let (rc, out, err) = info(&["info", s(&img)]);
    assert_eq!(rc, 4, "{out}{err}");
    for want in [
        "[0] ",
        "vhdx differencing",
        "8589934592",
        "unique id:     b298d413-f67e-412a-9a72-c7c7fc9b6cb5",
        "parent id:     ff34003b-11ed-4cf8-a166-b2be05e20b80",
        "locator relative_path .\\Generation 1_49C4BAF3",
        "parent:        (not opened; see the error below)",
    ] {
        assert!(out.contains(want), "stdout lacks {want:?}:\n{out}");
    }
    assert!(
        err.contains("parent ff34003b-11ed-4cf8-a166-b2be05e20b80 not found")
            && err.contains("tried ["),
        "{err}"
    );

    let (rc, out, err) = info(&["info", "--json", s(&img)]);
    assert_eq!(rc, 4, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let layers = v["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1);
    assert_eq!(
        layers[0]["unique_id"],
        "b298d413-f67e-412a-9a72-c7c7fc9b6cb5"
    );
    assert_eq!(
        layers[0]["parent_id"],
        "ff34003b-11ed-4cf8-a166-b2be05e20b80"
    );
    assert_eq!(layers[0]["disk_type"], "differencing");
    assert_eq!(layers[0]["parent_resolved"], Value::Null);
    assert_eq!(layers[0]["parent_locators"].as_array().unwrap().len(), 3);
    assert_eq!(v["error"]["exit_code"], 4);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("not found") && msg.contains("tried ["),
        "{msg}"
    );
    assert!(err.contains(msg), "stderr still has the message: {err}");
}

/// base <- mid <- leaf made with the CLI.
fn chain(d: &Path) -> [std::path::PathBuf; 3] {
    let base = d.join("base.vhd");
    let mid = d.join("mid.vhd");
    let leaf = d.join("leaf.vhd");
    chainfs_ok(&["create", s(&base), "--size", "4M"]);
    chainfs_ok(&["create", s(&mid), "--parent", s(&base)]);
    chainfs_ok(&["create", s(&leaf), "--parent", s(&mid)]);
    [base, mid, leaf]
}

#[test]
fn missing_base_shows_the_layers_above_it() {
    let d = TempDir::new().unwrap();
    let [base, _mid, leaf] = chain(d.path());

    // A complete chain: still the plain array, exit 0.
    let (rc, out, _) = info(&["info", "--json", s(&leaf)]);
    assert_eq!(rc, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().expect("an array").len(), 3);

    std::fs::rename(&base, d.path().join("moved.vhd")).unwrap();
    let (rc, out, err) = info(&["info", s(&leaf)]);
    assert_eq!(rc, 4, "{out}{err}");
    assert!(out.contains("[0] ") && out.contains("[1] "), "{out}");
    assert!(out.contains("mid.vhd") && !out.contains("[2]"), "{out}");
    assert!(
        err.contains("mid.vhd: parent") && err.contains("not found"),
        "{err}"
    );

    let (rc, out, _) = info(&["info", "--json", s(&leaf)]);
    assert_eq!(rc, 4);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["layers"].as_array().unwrap().len(), 2);
    assert_eq!(v["layers"][1]["parent_resolved"], Value::Null);
    assert_eq!(v["error"]["exit_code"], 4);
}

#[test]
fn id_mismatch_keeps_its_exit_code_and_shows_the_child() {
    let d = TempDir::new().unwrap();
    let [base, _mid, leaf] = chain(d.path());
    // Another disk under the base's name: found, but not the expected id.
    std::fs::remove_file(&base).unwrap();
    chainfs_ok(&["create", s(&base), "--size", "4M"]);
    let (rc, out, err) = info(&["info", s(&leaf)]);
    assert_eq!(rc, 5, "{out}{err}");
    assert!(
        out.contains("[1] ") && err.contains("expects a parent with id"),
        "{out}{err}"
    );
    let (rc, out, _) = info(&["info", "--json", s(&leaf)]);
    assert_eq!(rc, 5);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["layers"].as_array().unwrap().len(), 2);
    assert_eq!(v["error"]["exit_code"], 5);
}

#[test]
fn leaf_that_does_not_open_is_an_object_with_no_layers() {
    let d = TempDir::new().unwrap();
    let (rc, out, err) = info(&["info", "--json", s(&d.path().join("nope.vhd"))]);
    assert_eq!(rc, 4, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["layers"], serde_json::json!([]));
    assert_eq!(v["error"]["exit_code"], 4);
}
