//! Who the client is in the CRM: CallGate's lookup chain.
//!
//! For each entity type in the order contact → company → lead, search the normalised
//! number (`+` and digits) and then the number as it came; the first hit wins. Among
//! leads only unconverted ones count (a converted lead's client lives on as a contact
//! or company, found earlier in the chain). All searches go in one `batch` request and
//! the entities' details in a second one, so a lookup costs two requests.

use serde_json::{Value, json};

use super::client::Client;
use super::error::BitrixError;
use super::users::as_i64;

/// A CRM entity that owns a phone number.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// `CONTACT`, `COMPANY` or `LEAD`.
    pub entity_type: String,
    pub id: i64,
    pub assigned_by_id: Option<i64>,
    /// Display name (contact name, company or lead title).
    pub name: String,
}

impl Found {
    /// Bitrix24's numeric owner type id (`crm.activity.*` `ownerTypeId`).
    pub fn owner_type_id(&self) -> i64 {
        match self.entity_type.as_str() {
            "LEAD" => 1,
            "DEAL" => 2,
            "CONTACT" => 3,
            "COMPANY" => 4,
            _ => 0,
        }
    }
}

const ORDER: [&str; 3] = ["CONTACT", "COMPANY", "LEAD"];

/// The numbers to try, in order: normalised, then raw (when different).
pub fn candidates(raw: &str) -> Vec<String> {
    let digits = crate::phone::digits(raw);
    let mut out = Vec::new();
    if !digits.is_empty() {
        out.push(format!("+{digits}"));
    }
    let raw = raw.trim().to_string();
    if !raw.is_empty() && !out.contains(&raw) {
        out.push(raw);
    }
    if !digits.is_empty() && !out.contains(&digits) {
        out.push(digits);
    }
    out
}

/// Run the chain for `phone`.
pub async fn find(client: &Client, phone: &str) -> Result<Option<Found>, BitrixError> {
    let numbers = candidates(phone);
    if numbers.is_empty() {
        return Ok(None);
    }
    let mut cmds = Vec::new();
    for ty in ORDER {
        for (i, n) in numbers.iter().enumerate() {
            cmds.push((
                format!("{ty}_{i}"),
                "crm.duplicate.findbycomm".to_string(),
                json!({"type": "PHONE", "values": [n], "entity_type": ty}),
            ));
        }
    }
    let found = client.batch(&cmds, false).await?;
    for (key, method, params) in &cmds {
        if let Some(e) = found.error_of(key, method, params) {
            return Err(e);
        }
    }
    // Candidate ids in chain order.
    let mut ordered: Vec<(String, i64)> = Vec::new();
    for ty in ORDER {
        for i in 0..numbers.len() {
            let ids = found
                .results
                .get(&format!("{ty}_{i}"))
                .and_then(|r| r.get(ty))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for id in ids.iter().filter_map(|v| as_i64(Some(v))) {
                if !ordered.contains(&(ty.to_string(), id)) {
                    ordered.push((ty.to_string(), id));
                }
            }
        }
    }
    if ordered.is_empty() {
        return Ok(None);
    }
    ordered.truncate(50);
    let gets: Vec<_> = ordered
        .iter()
        .map(|(ty, id)| {
            (
                format!("{ty}_{id}"),
                format!("crm.{}.get", ty.to_lowercase()),
                json!({"id": id}),
            )
        })
        .collect();
    let details = client.batch(&gets, false).await?;
    for (ty, id) in &ordered {
        let Some(e) = details.results.get(&format!("{ty}_{id}")) else {
            continue;
        };
        if ty == "LEAD" && converted_lead(e) {
            continue;
        }
        let name = entity_name(ty, e);
        return Ok(Some(Found {
            entity_type: ty.clone(),
            id: *id,
            assigned_by_id: as_i64(e.get("ASSIGNED_BY_ID")),
            name,
        }));
    }
    Ok(None)
}

/// A converted lead's client lives on as a contact or company: lookups skip it.
pub fn converted_lead(e: &Value) -> bool {
    e.get("STATUS_SEMANTIC_ID").and_then(Value::as_str) == Some("S")
        || e.get("STATUS_ID").and_then(Value::as_str) == Some("CONVERTED")
}

/// Display name of an entity from `crm.<type>.get`: a contact's first and last name,
/// otherwise the title.
pub fn entity_name(entity_type: &str, e: &Value) -> String {
    match entity_type {
        "CONTACT" => [e.get("NAME"), e.get("LAST_NAME")]
            .iter()
            .filter_map(|v| v.and_then(Value::as_str))
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" "),
        _ => e
            .get("TITLE")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
    }
}

/// The one-request alternative: `telephony.externalCall.searchCrmEntities`, which
/// answers the entities with their responsible user (and that user's internal number).
pub async fn search_crm_entities(
    client: &Client,
    phone: &str,
) -> Result<Option<Found>, BitrixError> {
    for n in candidates(phone) {
        let r = client
            .call(
                "telephony.externalCall.searchCrmEntities",
                json!({"PHONE_NUMBER": n}),
            )
            .await?;
        let list = r.as_array().cloned().unwrap_or_default();
        for ty in ORDER {
            if let Some(e) = list
                .iter()
                .find(|e| e.get("CRM_ENTITY_TYPE").and_then(Value::as_str) == Some(ty))
            {
                return Ok(Some(Found {
                    entity_type: ty.to_string(),
                    id: as_i64(e.get("CRM_ENTITY_ID")).unwrap_or(0),
                    assigned_by_id: as_i64(e.get("ASSIGNED_BY_ID"))
                        .or_else(|| as_i64(e.get("ASSIGNED_BY").and_then(|a| a.get("ID")))),
                    name: e
                        .get("NAME")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                }));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_normalised_first() {
        assert_eq!(
            candidates("8 (916) 123-45-67"),
            vec!["+89161234567", "8 (916) 123-45-67", "89161234567"]
        );
        assert_eq!(
            candidates("+79161234567"),
            vec!["+79161234567", "79161234567"]
        );
        assert!(candidates("  ").is_empty());
    }
}
