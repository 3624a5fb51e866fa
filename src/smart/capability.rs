//! The SMART security section of the CapabilityStatement (SMART App Launch 2.2,
//! conformance.html §"FHIR Authorization Endpoint and Capabilities Discovery using a FHIR
//! CapabilityStatement").

use serde_json::{Value, json};

use crate::config::SmartConfig;

/// `http://terminology.hl7.org/CodeSystem/restful-security-service`
const SECURITY_SERVICE: &str = "http://terminology.hl7.org/CodeSystem/restful-security-service";
/// The SMART oauth-uris extension.
const OAUTH_URIS: &str = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris";

/// Adds the SMART security section to every `rest` entry of a CapabilityStatement:
/// `service` SMART-on-FHIR, `cors: true`, and the oauth-uris extension with the
/// configured endpoints (replacing any the upstream declared). Returns false when the
/// document is not a CapabilityStatement.
pub fn augment(statement: &mut Value, smart: Option<&SmartConfig>) -> bool {
    if statement["resourceType"] != "CapabilityStatement" {
        return false;
    }
    let Some(obj) = statement.as_object_mut() else {
        return false;
    };
    let rest = obj
        .entry("rest")
        .or_insert_with(|| json!([{"mode": "server"}]));
    let Some(rest) = rest.as_array_mut() else {
        return false;
    };
    for entry in rest.iter_mut().filter(|e| e.is_object()) {
        let security = entry
            .as_object_mut()
            .map(|e| e.entry("security").or_insert_with(|| json!({})));
        let Some(security) = security.and_then(Value::as_object_mut) else {
            continue;
        };
        security.insert("cors".to_owned(), json!(true));
        let services = security.entry("service").or_insert_with(|| json!([]));
        if let Some(list) = services.as_array_mut() {
            let has = list.iter().any(|s| {
                s["coding"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["code"] == "SMART-on-FHIR"))
            });
            if !has {
                list.push(json!({
                    "coding": [{"system": SECURITY_SERVICE, "code": "SMART-on-FHIR"}],
                    "text": "OAuth2 using SMART-on-FHIR profile (see http://docs.smarthealthit.org)"
                }));
            }
        }
        if let Some(smart) = smart {
            let mut uris = Vec::new();
            for (url, v) in [
                ("authorize", &smart.authorization_endpoint),
                ("token", &Some(smart.token_endpoint.clone())),
                ("introspect", &smart.introspection_endpoint),
                ("revoke", &smart.revocation_endpoint),
                ("manage", &smart.management_endpoint),
                ("register", &smart.registration_endpoint),
            ] {
                if let Some(v) = v {
                    uris.push(json!({"url": url, "valueUri": v}));
                }
            }
            let extensions = security.entry("extension").or_insert_with(|| json!([]));
            if let Some(list) = extensions.as_array_mut() {
                list.retain(|e| e["url"] != OAUTH_URIS);
                list.push(json!({"url": OAUTH_URIS, "extension": uris}));
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smart() -> SmartConfig {
        SmartConfig {
            authorization_endpoint: Some("https://as/authorize".into()),
            token_endpoint: "https://as/token".into(),
            capabilities: vec!["launch-standalone".into()],
            introspection_endpoint: Some("https://as/introspect".into()),
            ..SmartConfig::default()
        }
    }

    /// The security section is added, and an upstream's own oauth-uris are replaced.
    #[test]
    fn adds_security() {
        let mut cs = json!({
            "resourceType": "CapabilityStatement",
            "rest": [{"mode": "server", "security": {"extension": [
                {"url": OAUTH_URIS, "extension": [{"url": "token", "valueUri": "http://internal/token"}]}
            ]}}]
        });
        assert!(augment(&mut cs, Some(&smart())));
        let sec = &cs["rest"][0]["security"];
        assert_eq!(sec["cors"], true);
        assert_eq!(sec["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
        let ext = sec["extension"].as_array().unwrap();
        assert_eq!(ext.len(), 1);
        let uris = ext[0]["extension"].as_array().unwrap();
        assert!(
            uris.iter()
                .any(|u| u["url"] == "token" && u["valueUri"] == "https://as/token")
        );
        assert!(uris.iter().any(|u| u["url"] == "introspect"));
        assert!(!cs.to_string().contains("internal"));
        // Idempotent: a second pass adds no duplicate service.
        augment(&mut cs, Some(&smart()));
        assert_eq!(
            cs["rest"][0]["security"]["service"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }

    /// Anything but a CapabilityStatement is left alone.
    #[test]
    fn ignores_other_documents() {
        let mut oo = json!({"resourceType": "OperationOutcome"});
        assert!(!augment(&mut oo, Some(&smart())));
        let mut cs = json!({"resourceType": "CapabilityStatement"});
        assert!(augment(&mut cs, None));
        assert_eq!(cs["rest"][0]["security"]["cors"], true);
    }
}
