//! Validation of custom resources against vendored upstream CustomResourceDefinitions (the
//! prometheus-operator's and cert-manager's, in tests/fixtures), as the API server validates
//! them: the `openAPIV3Schema` of the object's `apiVersion` and `kind`, with every object
//! schema that lists its `properties` closed to other fields. kube-apiserver prunes unknown
//! fields of a structural schema, and with `kubectl apply`'s default `--validate=strict`
//! (field validation Strict) it refuses them instead; closing the schema makes a misspelt
//! field fail here as it would there. `x-kubernetes-preserve-unknown-fields` and explicit
//! `additionalProperties` are left as the CRD says. CEL rules (`x-kubernetes-validations`)
//! are not evaluated.
//!
//! The check runs in python `jsonschema` (Draft 4, whose keywords OpenAPI v3.0 schemas use),
//! from the venv scripts/test makes for the manifest tests. The schemas are not checked
//! against the Draft 4 metaschema: some upstream `pattern`s are Go (RE2) expressions Python
//! cannot compile (`^(?i)(abort|warn)?$`), which only matters for fields our objects leave out.

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

/// The schema a CRD gives objects of `apiVersion` (group/version) and `kind`.
struct CrdSchema {
    api_version: String,
    kind: String,
    schema: Value,
}

fn load(crd: &Path) -> Vec<CrdSchema> {
    let text = std::fs::read_to_string(crd).unwrap_or_else(|e| panic!("{}: {e}", crd.display()));
    let crd: Value = serde_saphyr::from_str(&text).unwrap();
    assert_eq!(crd["kind"], "CustomResourceDefinition");
    let group = crd["spec"]["group"].as_str().unwrap();
    let kind = crd["spec"]["names"]["kind"].as_str().unwrap();
    crd["spec"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["served"] == true)
        .map(|v| {
            let mut schema = v["schema"]["openAPIV3Schema"].clone();
            close(&mut schema);
            CrdSchema {
                api_version: format!("{group}/{}", v["name"].as_str().unwrap()),
                kind: kind.to_owned(),
                schema,
            }
        })
        .collect()
}

/// Closes every object schema with `properties` and no say about other fields.
fn close(schema: &mut Value) {
    let Some(object) = schema.as_object_mut() else { return };
    let open = object.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if object.contains_key("properties") && !object.contains_key("additionalProperties") && !open {
        object.insert("additionalProperties".into(), Value::Bool(false));
    }
    // `metadata` is ObjectMeta, which the API server validates itself; the CRD says only
    // `type: object`, so it stays open (it has no `properties`).
    for key in ["properties", "patternProperties"] {
        if let Some(Value::Object(children)) = object.get_mut(key) {
            children.values_mut().for_each(close);
        }
    }
    for key in ["items", "additionalProperties", "not"] {
        if let Some(child) = object.get_mut(key) {
            close(child);
        }
    }
    for key in ["anyOf", "allOf", "oneOf"] {
        if let Some(Value::Array(children)) = object.get_mut(key) {
            children.iter_mut().for_each(close);
        }
    }
}

/// Validates `objects` against the CRDs in `crd_files`; every object must be of a kind and
/// version one of them serves. Errors name the object and the path of each failure.
pub fn validate(objects: &[&Value], crd_files: &[&Path]) -> Result<(), String> {
    const SCRIPT: &str = r#"
import json, sys
import jsonschema
errors = []
for case in json.load(sys.stdin):
    for e in jsonschema.Draft4Validator(case["schema"]).iter_errors(case["object"]):
        errors.append(f"{case['name']}: {'/'.join(map(str, e.absolute_path))}: {e.message}")
print("\n".join(errors))
sys.exit(1 if errors else 0)
"#;
    let schemas: Vec<CrdSchema> = crd_files.iter().flat_map(|f| load(f)).collect();
    let mut cases = Vec::new();
    for object in objects {
        let name = format!("{}/{}", object["kind"].as_str().unwrap_or("?"), object["metadata"]["name"]);
        let Some(crd) =
            schemas.iter().find(|s| object["apiVersion"] == s.api_version && object["kind"] == s.kind)
        else {
            return Err(format!(
                "{name}: no vendored CRD serves {} {}",
                object["apiVersion"], object["kind"]
            ));
        };
        cases.push(json!({"name": name, "schema": crd.schema, "object": object}));
    }
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/test makes target/test-venv)");
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        serde_json::to_string(&cases).unwrap().as_bytes(),
    )
    .unwrap();
    let output = child.wait_with_output().unwrap();
    let report =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if output.status.success() { Ok(()) } else { Err(report) }
}
