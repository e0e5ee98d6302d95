//! `crds/` must hold exactly what the Rust types generate, so that the YAML users apply and the types
//! the operator runs with never drift apart.

use delegation_operator::api;

#[test]
fn checked_in_crds_match_the_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let crds = api::crds();
    for crd in &crds {
        let path = dir.join(api::crd_file_name(crd));
        let on_disk =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            on_disk == api::crd_yaml(crd).unwrap(),
            "{} is out of date: run `cargo run -q -- crds --dir crds`",
            path.display()
        );
    }
    let files = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(
        files,
        crds.len(),
        "crds/ holds files the types do not generate"
    );
}

#[test]
fn crds_carry_no_defaults() {
    // A `default:` would make the apiserver write values the user never did, and GitOps tools would
    // report drift forever.
    for crd in api::crds() {
        let json = serde_json::to_value(&crd).unwrap();
        let mut stack = vec![&json];
        while let Some(v) = stack.pop() {
            match v {
                serde_json::Value::Object(m) => {
                    assert!(
                        !m.contains_key("default"),
                        "{:?} has a default: {m:?}",
                        crd.metadata.name
                    );
                    stack.extend(m.values());
                }
                serde_json::Value::Array(a) => stack.extend(a),
                _ => {}
            }
        }
    }
}
