//! What a Kommo registration says about the client's responsible user, for the
//! autodistribution cache: read from the delivery report, no request.
//!
//! The answer must equal what [`KommoConnector::find_responsible`] would give for the
//! same number: that lookup takes the first contact found by phone whose
//! `responsible_user_id` maps to an internal number (`[kommo.users]`), its name cut to 20
//! characters and its contact JSON as the entity. The registration works on that same
//! first contact, so:
//!
//! * responsible user = the one an update during this registration set
//!   (`update_responsible_on_answer`, or a `process_contact_update_params`
//!   customization), else the contact's own;
//! * mapped to an internal number → [`LearnedResponsible::Found`]; not mapped →
//!   [`LearnedResponsible::NoRoute`] (a later contact might still match, so nothing is
//!   cached, but a stale answer is dropped);
//! * entity = the contact as the search returned it (with the new responsible user when
//!   it changed); for a contact this registration created, the fields kolokol sent
//!   (`id`, `name`, `responsible_user_id`, the phone, the lead).
//!
//! The lead's responsible user is not used: the lookup does not read it either.
//!
//! [`KommoConnector::find_responsible`]: super::KommoConnector

use serde_json::{Value, json};

use super::KommoConfig;
use super::connector::{as_id, caller_id_name};
use crate::crm::{LearnedResponsible, Responsible};

/// Read a `register` report (`{"registered": true, "phone", "contact", "lead",
/// "contact_update", ...}`). `None` when the call was not registered or no contact is
/// known.
pub fn responsible_from_report(cfg: &KommoConfig, report: &Value) -> Option<LearnedResponsible> {
    if report.get("registered") != Some(&Value::Bool(true)) {
        return None;
    }
    let phone = report.get("phone")?.as_str()?.trim().to_string();
    if crate::phone::digits(&phone).is_empty() {
        return None;
    }
    let contact = report.get("contact")?;
    let contact_id = as_id(contact.get("id"))?;
    let update = report.get("contact_update");
    let updated_to = update
        .filter(|u| u.get("updated") == Some(&Value::Bool(true)))
        .and_then(|u| as_id(u.pointer("/params/responsible_user_id")));
    let Some(user) = updated_to.or_else(|| as_id(contact.get("responsible_user_id"))) else {
        // Kommo gave the contact some default user we do not know: drop what is cached.
        return Some(LearnedResponsible::NoRoute { phone });
    };
    let Some(extension) = cfg.extension_of(user) else {
        return Some(LearnedResponsible::NoRoute { phone });
    };
    let name = contact
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let entity = match contact.get("found") {
        Some(found @ Value::Object(_)) => {
            let mut e = found.clone();
            e["responsible_user_id"] = json!(user);
            e
        }
        _ => {
            let mut e = json!({
                "id": contact_id,
                "name": name,
                "responsible_user_id": user,
                "custom_fields_values": [{"field_code": "PHONE", "values": [{"value": phone}]}],
            });
            let lead = as_id(report.pointer("/lead/id")).or_else(|| as_id(contact.get("lead_id")));
            if let Some(lead) = lead {
                e["_embedded"] = json!({"leads": [{"id": lead}]});
            }
            e
        }
    };
    Some(LearnedResponsible::Found {
        phone,
        responsible: Responsible {
            extension: extension.to_string(),
            name: caller_id_name(&name),
            entity,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> KommoConfig {
        let mut c = KommoConfig::default();
        c.users.insert("101".into(), 5002);
        c.users.insert("102".into(), 5003);
        c
    }

    fn found_report(update: Value) -> Value {
        json!({
            "registered": true, "phone": "+79161234567",
            "contact": {
                "id": 7, "name": "Ivan Petrovich Sidorov-Petrov", "responsible_user_id": 5002,
                "created": false, "lead_id": 9, "lead_responsible_user_id": 5002,
                "found": {"id": 7, "name": "Ivan Petrovich Sidorov-Petrov", "responsible_user_id": 5002,
                          "_embedded": {"leads": [{"id": 9}]}},
            },
            "lead": {"id": 9, "created": false, "responsible_user_id": 5002},
            "contact_update": update,
        })
    }

    #[test]
    fn found_contact_gives_the_lookup_answer() {
        let r = responsible_from_report(&cfg(), &found_report(json!({"updated": false})));
        let Some(LearnedResponsible::Found { phone, responsible }) = r else {
            panic!("{r:?}");
        };
        assert_eq!(phone, "+79161234567");
        assert_eq!(responsible.extension, "101");
        assert_eq!(responsible.name, "Ivan Petrovich Sidor");
        assert_eq!(
            responsible.entity,
            found_report(Value::Null)["contact"]["found"]
        );
    }

    #[test]
    fn responsible_changed_by_the_registration_wins() {
        let r = responsible_from_report(
            &cfg(),
            &found_report(json!({"updated": true, "params": {"responsible_user_id": 5003}})),
        );
        let Some(LearnedResponsible::Found { responsible, .. }) = r else {
            panic!("{r:?}");
        };
        assert_eq!(responsible.extension, "102");
        assert_eq!(responsible.entity["responsible_user_id"], 5003);
        // An update that touched other fields only keeps the contact's user.
        let r = responsible_from_report(
            &cfg(),
            &found_report(json!({"updated": true, "params": {"tags": ["x"]}})),
        );
        assert!(
            matches!(r, Some(LearnedResponsible::Found { ref responsible, .. }) if responsible.extension == "101")
        );
    }

    #[test]
    fn unmapped_user_means_no_route_and_unregistered_says_nothing() {
        let r = responsible_from_report(
            &cfg(),
            &found_report(json!({"updated": true, "params": {"responsible_user_id": 1}})),
        );
        assert_eq!(
            r,
            Some(LearnedResponsible::NoRoute {
                phone: "+79161234567".into()
            })
        );
        let no = json!({"registered": false, "reason": "internal call"});
        assert_eq!(responsible_from_report(&cfg(), &no), None);
        let cancelled = json!({"registered": true, "phone": "+79161234567",
            "contact": {"id": null, "created": false, "cancelled": "process_contact_creation_params"}});
        assert_eq!(responsible_from_report(&cfg(), &cancelled), None);
    }

    #[test]
    fn created_contact_is_described_by_what_was_sent() {
        let report = json!({
            "registered": true, "phone": "+79161234567",
            "contact": {"id": 11, "name": "Contact +79161234567", "responsible_user_id": 5003, "created": true, "lead_id": null},
            "lead": {"id": 12, "created": true, "responsible_user_id": 5003},
        });
        let r = responsible_from_report(&cfg(), &report);
        let Some(LearnedResponsible::Found { responsible, .. }) = r else {
            panic!("{r:?}");
        };
        assert_eq!(responsible.extension, "102");
        assert_eq!(responsible.name, "Contact +79161234567");
        assert_eq!(responsible.entity["id"], 11);
        assert_eq!(responsible.entity["responsible_user_id"], 5003);
        assert_eq!(responsible.entity["_embedded"]["leads"][0]["id"], 12);
    }
}
