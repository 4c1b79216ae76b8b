//! Building each hook's input and reading its outcome, so every caller sends the
//! documented shapes (`customizations/README.md`) and applies the same rules.
//!
//! Inputs: `*_input` functions. Outcomes: `*_from` functions that take the
//! [`HookOutcome`] and kolokol's default and return what to do.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use super::HookOutcome;
use crate::calls::{CallFull, Stage};

fn call_full_value(call_full: &CallFull) -> Value {
    serde_json::to_value(call_full).unwrap_or_default()
}

/// `need_registration`: `{"call_full", "call_stage"}`.
pub fn need_registration_input(call_full: &CallFull, stage: Stage) -> Value {
    json!({"call_full": call_full_value(call_full), "call_stage": stage.as_str()})
}

/// `process_client_phone`: `{"phone", "call_full", "call_stage"}`.
pub fn client_phone_input(phone: &str, call_full: &CallFull, stage: Stage) -> Value {
    json!({
        "phone": phone,
        "call_full": call_full_value(call_full),
        "call_stage": stage.as_str()
    })
}

/// The CRM-parameter hooks (`process_call_params`, `process_*_creation_params`,
/// `process_*_update_params`, `process_task_creation_params`): the request's parameters
/// with `call_full` added. Non-object params are wrapped as `{"params": ...}`.
pub fn crm_params_input(params: &Value, call_full: &CallFull) -> Value {
    let mut map = match params {
        Value::Object(m) => m.clone(),
        other => {
            let mut m = Map::new();
            m.insert("params".into(), other.clone());
            m
        }
    };
    map.insert("call_full".into(), call_full_value(call_full));
    Value::Object(map)
}

/// `process_record_file_path`: `{"call_full", "path"}`.
pub fn record_file_path_input(call_full: &CallFull, path: &Path) -> Value {
    json!({"call_full": call_full_value(call_full), "path": path.to_string_lossy()})
}

/// The parameters of an AMI Originate that `process_originate_params` may change.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OriginateParams {
    pub caller_id: String,
    pub channel: String,
    pub context: String,
    pub extension: String,
    pub priority: String,
}

/// `process_originate_params`: `{"params": {caller_id, channel, context, extension,
/// priority, request_data}}`; `request_data` is the CRM's request, read-only.
pub fn originate_input(params: &OriginateParams, request_data: &Value) -> Value {
    json!({"params": {
        "caller_id": params.caller_id,
        "channel": params.channel,
        "context": params.context,
        "extension": params.extension,
        "priority": params.priority,
        "request_data": request_data
    }})
}

/// What `autodistribution` gets. Empty `from`/`trunk`/`error` and a null `entity` are
/// left out, as documented.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AutodistributionInput {
    pub number: String,
    pub name: String,
    pub from: String,
    pub trunk: String,
    pub request_data: Value,
    pub entity: Value,
    pub error: String,
}

pub fn autodistribution_input(a: &AutodistributionInput) -> Value {
    let mut m = Map::new();
    m.insert("number".into(), a.number.clone().into());
    m.insert("name".into(), a.name.clone().into());
    for (k, v) in [("from", &a.from), ("trunk", &a.trunk), ("error", &a.error)] {
        if !v.is_empty() {
            m.insert(k.into(), v.clone().into());
        }
    }
    m.insert(
        "request_data".into(),
        if a.request_data.is_null() {
            Value::Object(Map::new())
        } else {
            a.request_data.clone()
        },
    );
    if !a.entity.is_null() {
        m.insert("entity".into(), a.entity.clone());
    }
    Value::Object(m)
}

/// `post_registration`: `{"call_full", "call_stage", "crm", "result"}`.
pub fn post_registration_input(
    call_full: &CallFull,
    stage: Stage,
    crm: &str,
    result: &Value,
) -> Value {
    json!({
        "call_full": call_full_value(call_full),
        "call_stage": stage.as_str(),
        "crm": crm,
        "result": result
    })
}

/// The phone to use after `process_client_phone`; `None` when the script cancelled.
pub fn phone_from(outcome: &HookOutcome, default: &str) -> Option<String> {
    match outcome {
        HookOutcome::Cancelled => None,
        HookOutcome::Data(v) => Some(match v.get("phone") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => default.to_string(),
        }),
        HookOutcome::Default { .. } => Some(default.to_string()),
    }
}

/// The request parameters after a CRM-parameter hook: the script's object replaces the
/// parameters as a whole; `None` when it cancelled the request. Data that is not an
/// object is ignored (kolokol's parameters are used).
pub fn params_from(outcome: &HookOutcome, default: &Value) -> Option<Value> {
    match outcome {
        HookOutcome::Cancelled => None,
        HookOutcome::Data(v @ Value::Object(_)) => Some(v.clone()),
        HookOutcome::Data(_) | HookOutcome::Default { .. } => Some(default.clone()),
    }
}

/// The originate parameters after `process_originate_params`; `None` = don't call.
/// Fields the script left out keep kolokol's values.
pub fn originate_from(outcome: &HookOutcome, default: &OriginateParams) -> Option<OriginateParams> {
    let data = match outcome {
        HookOutcome::Cancelled => return None,
        HookOutcome::Data(v) => v,
        HookOutcome::Default { .. } => return Some(default.clone()),
    };
    let field = |key: &str, fallback: &String| match data.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => fallback.clone(),
    };
    Some(OriginateParams {
        caller_id: field("caller_id", &default.caller_id),
        channel: field("channel", &default.channel),
        context: field("context", &default.context),
        extension: field("extension", &default.extension),
        priority: field("priority", &default.priority),
    })
}

/// The recording to use after `process_record_file_path`.
pub fn record_path_from(outcome: &HookOutcome, default: &Path) -> PathBuf {
    match outcome {
        HookOutcome::Data(v) => match v.get("path").and_then(Value::as_str) {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => default.to_path_buf(),
        },
        _ => default.to_path_buf(),
    }
}

/// `(number, name)` to ring after `autodistribution` (read-only fields were already
/// dropped and `name` cut to 20 characters by the runner).
pub fn autodistribution_from(
    outcome: &HookOutcome,
    default_number: &str,
    default_name: &str,
) -> (String, String) {
    let data = outcome.data();
    let get = |key: &str, fallback: &str| {
        data.and_then(|d| d.get(key))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or(fallback)
            .to_string()
    };
    (get("number", default_number), get("name", default_name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default() -> HookOutcome {
        HookOutcome::Default {
            reason: "not installed".into(),
        }
    }

    #[test]
    fn inputs_have_the_documented_shapes() {
        let cf = CallFull {
            id: "1.1".into(),
            client_phone: "8916".into(),
            ..Default::default()
        };
        let v = need_registration_input(&cf, Stage::CallEnded);
        assert_eq!(v["call_stage"], "call_ended");
        assert_eq!(v["call_full"]["id"], "1.1");
        let v = crm_params_input(&json!({"name": "x"}), &cf);
        assert_eq!(v["name"], "x");
        assert_eq!(v["call_full"]["client_phone"], "8916");
        let v = autodistribution_input(&AutodistributionInput {
            number: "101".into(),
            name: "Anna".into(),
            from: "8916".into(),
            ..Default::default()
        });
        assert_eq!(
            v,
            json!({"number": "101", "name": "Anna", "from": "8916", "request_data": {}})
        );
        let v = originate_input(
            &OriginateParams {
                extension: "8916".into(),
                ..Default::default()
            },
            &json!({"to": "8916"}),
        );
        assert_eq!(v["params"]["request_data"]["to"], "8916");
    }

    #[test]
    fn outcomes_apply_defaults_and_cancellation() {
        assert_eq!(phone_from(&default(), "+7916"), Some("+7916".into()));
        assert_eq!(phone_from(&HookOutcome::Cancelled, "+7916"), None);
        assert_eq!(
            phone_from(&HookOutcome::Data(json!({"phone": "7916"})), "+7916"),
            Some("7916".into())
        );
        let d = json!({"a": 1});
        assert_eq!(
            params_from(&HookOutcome::Data(json!([1])), &d),
            Some(d.clone())
        );
        assert_eq!(params_from(&HookOutcome::Cancelled, &d), None);
        let base = OriginateParams {
            context: "from-internal".into(),
            extension: "+7916".into(),
            ..Default::default()
        };
        let o = originate_from(&HookOutcome::Data(json!({"extension": "8916"})), &base).unwrap();
        assert_eq!(
            (o.context.as_str(), o.extension.as_str()),
            ("from-internal", "8916")
        );
        assert_eq!(
            record_path_from(
                &HookOutcome::Data(json!({"path": "/a.mp3"})),
                Path::new("/a.wav")
            ),
            PathBuf::from("/a.mp3")
        );
        assert_eq!(
            autodistribution_from(&HookOutcome::Data(json!({"number": "205"})), "101", "Anna"),
            ("205".to_string(), "Anna".to_string())
        );
    }
}
