//! What a finished Bitrix24 call says about the client's responsible user, for the
//! autodistribution cache.
//!
//! A finished call's report names the CRM entity Bitrix24 bound the call to
//! (`crm_entity_type`, `crm_entity_id`), which is the client the lookup chain finds
//! (Bitrix24 binds by the same phone search). Its responsible user and name are not in
//! the report, and may just have been changed (`set_responsible_on_answer`, a
//! customization), so the entity is read once with `crm.<type>.get`: one request after
//! the call, instead of the lookup's two during the client's next call, and only when
//! the portal's request budget is at least half unused (it allows 2 requests/s). The answer is
//! built exactly like [`Bitrix24::find_responsible`]'s: `ASSIGNED_BY_ID` → the user's
//! `UF_PHONE_INNER` (employee directory, in memory), the entity's name (else the
//! employee's), entity `{"type", "id", "assigned_by_id"}`.
//!
//! [`Bitrix24::find_responsible`]: super::Bitrix24

use serde_json::{Value, json};
use tracing::debug;

use super::Bitrix24;
use super::lookup::{converted_lead, entity_name};
use super::users::as_i64;
use crate::calls::Stage;
use crate::crm::{Job, LearnedResponsible, Responsible};

/// Read a `call_ended` report and the entity it names. `None` when the call is not
/// bound to an entity or Bitrix24 did not answer.
pub async fn responsible_from_report(
    b24: &Bitrix24,
    job: &Job,
    report: &Value,
) -> Option<LearnedResponsible> {
    if job.stage != Stage::CallEnded {
        return None;
    }
    let phone = job.call_full.client_phone.trim().to_string();
    if crate::phone::digits(&phone).is_empty() {
        return None;
    }
    let ty = report.get("crm_entity_type")?.as_str()?;
    let id = as_i64(report.get("crm_entity_id")).filter(|i| *i > 0)?;
    if !matches!(ty, "CONTACT" | "COMPANY" | "LEAD") {
        return None;
    }
    if !b24.client().has_spare_capacity() {
        // Bitrix24 allows 2 requests/s: with calls waiting for the budget, warming the
        // cache would slow their registration down. The next call is looked up instead.
        debug!(crm = "bitrix24", call_id = %job.call_full.id, "portal busy: autodistribution cache not warmed");
        return None;
    }
    let method = format!("crm.{}.get", ty.to_lowercase());
    let e = match b24.client().call(&method, json!({"id": id})).await {
        Ok(e) if e.is_object() => e,
        Ok(_) => return None,
        Err(e) => {
            debug!(crm = "bitrix24", call_id = %job.call_full.id, error = %e, "cannot read the call's entity to warm the autodistribution cache");
            return None;
        }
    };
    if ty == "LEAD" && converted_lead(&e) {
        // The lookup skips converted leads and finds the client elsewhere.
        return Some(LearnedResponsible::NoRoute { phone });
    }
    let Some(user) = as_i64(e.get("ASSIGNED_BY_ID")) else {
        return Some(LearnedResponsible::NoRoute { phone });
    };
    let employee = match b24.directory().by_id(user).await {
        Ok(Some(emp)) => emp,
        Ok(None) => return Some(LearnedResponsible::NoRoute { phone }),
        Err(e) => {
            debug!(crm = "bitrix24", error = %e, "employee directory unavailable; cache not warmed");
            return None;
        }
    };
    let name = entity_name(ty, &e);
    Some(LearnedResponsible::Found {
        phone,
        responsible: Responsible {
            extension: employee.extension,
            name: if name.is_empty() { employee.name } else { name },
            entity: json!({"type": ty, "id": id, "assigned_by_id": user}),
        },
    })
}
