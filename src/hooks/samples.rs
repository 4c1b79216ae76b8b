//! A realistic sample input for every hook, in the documented shapes. `kolokol hook run`
//! uses it when no `--input` is given, so an admin can try a script without a call.

use serde_json::{Value, json};

use super::names::Hook;

/// A `call_full` of an answered inbound call (the fields every hook can rely on, plus a
/// few of the tracker's extras).
pub fn sample_call_full() -> Value {
    json!({
        "id": "1700000000.100",
        "direction": "inbound",
        "client_phone": "89161234567",
        "line_number": "74951234567",
        "answered_by": "101",
        "result": 200,
        "record": "/var/spool/asterisk/monitor/2026/11/22/in-74951234567-89161234567-20261122-101500-1700000000.100.wav",
        "duration": 95,
        "talk_duration": 80,
        "trunk": "sip-provider",
        "created_at": 1700000000
    })
}

/// The sample input for `hook`.
pub fn sample_input(hook: Hook) -> Value {
    let call_full = sample_call_full();
    match hook {
        Hook::NeedRegistration => json!({
            "call_full": call_full,
            "call_stage": "conversation_requested"
        }),
        Hook::ProcessCallParams => json!({
            "call_full": call_full,
            "call_result": "",
            "call_status": 4,
            "created_at": 1700000000,
            "created_by": 0,
            "direction": "inbound",
            "duration": 80,
            "link": "https://pbx.example.com/records/abc123.mp3",
            "phone": "+79161234567",
            "responsible_user_id": 5012345,
            "source": "kolokol"
        }),
        Hook::ProcessClientPhone => json!({
            "phone": "89161234567",
            "call_full": call_full,
            "call_stage": "conversation_requested"
        }),
        Hook::ProcessContactCreationParams => json!({
            "call_full": call_full,
            "custom_fields_values": [
                {"field_id": 264911, "values": [{"enum_code": "WORK", "value": "+79161234567"}]}
            ],
            "name": "Contact +79161234567",
            "responsible_user_id": 5012345,
            "tags": ["kolokol"]
        }),
        Hook::ProcessLeadCreationParams => json!({
            "call_full": call_full,
            "_embedded": {"contacts": [{"id": 1234567}], "tags": [{"name": "kolokol"}]},
            "name": "+79161234567 - incoming",
            "pipeline_id": 7654321,
            "responsible_user_id": 5012345,
            "status_id": 142
        }),
        Hook::ProcessOriginateParams => json!({
            "params": {
                "caller_id": "\"CRM call\" <101>",
                "channel": "PJSIP/101",
                "context": "from-internal",
                "extension": "+7 (916) 123-45-67",
                "priority": "1",
                "request_data": {"from": "101", "to": "+7 (916) 123-45-67", "user_id": 5012345}
            }
        }),
        Hook::ProcessRecordFilePath => json!({
            "call_full": call_full,
            "path": "/var/spool/asterisk/monitor/2026/11/22/in-74951234567-89161234567-20261122-101500-1700000000.100.wav"
        }),
        Hook::ProcessTaskCreationParams => json!({
            "call_full": call_full,
            "complete_till": 1700003600,
            "created_by": 0,
            "entity_id": 1234567,
            "entity_type": "contacts",
            "is_completed": false,
            "responsible_user_id": 5012345,
            "task_type": 1,
            "text": "Call back Contact +79161234567 on a missed call from a number +79161234567"
        }),
        Hook::Autodistribution => json!({
            "number": "101",
            "name": "Anna Smirnova",
            "from": "89161234567",
            "trunk": "sip-provider",
            "request_data": {"from": "89161234567", "trunk": "sip-provider", "did": "74951234567"},
            "entity": {"type": "contact", "id": 1234567, "name": "Ivan Petrov", "responsible_user_id": 5012345}
        }),
        Hook::PostRegistration => json!({
            "call_full": call_full,
            "call_stage": "call_ended",
            "crm": "kommo",
            "result": {"call_id": 998877, "entity_type": "contacts", "entity_id": 1234567}
        }),
        Hook::ProcessContactUpdateParams => json!({
            "call_full": call_full,
            "id": 1234567,
            "name": "Ivan Petrov",
            "responsible_user_id": 5012345,
            "custom_fields_values": [
                {"field_id": 264911, "values": [{"enum_code": "WORK", "value": "+79161234567"}]}
            ]
        }),
        Hook::ProcessLeadUpdateParams => json!({
            "call_full": call_full,
            "id": 7777777,
            "name": "+79161234567 - incoming",
            "pipeline_id": 7654321,
            "status_id": 142,
            "responsible_user_id": 5012345
        }),
        Hook::ProcessUnsortedCreationParams => json!({
            "call_full": call_full,
            "source_uid": "1700000000.100",
            "source_name": "kolokol",
            "pipeline_id": 7654321,
            "created_at": 1700000000,
            "metadata": {
                "from": "+79161234567",
                "phone": "+79161234567",
                "called_at": 1700000000,
                "duration": 80,
                "link": "https://pbx.example.com/records/abc123.mp3",
                "service_code": "kolokol",
                "is_call_event_needed": true
            },
            "_embedded": {
                "leads": [{"name": "+79161234567 - missed incoming"}],
                "contacts": [{
                    "name": "Contact +79161234567",
                    "custom_fields_values": [
                        {"field_code": "PHONE", "values": [{"enum_code": "WORK", "value": "+79161234567"}]}
                    ]
                }]
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hook_has_an_object_sample() {
        for h in Hook::ALL {
            assert!(sample_input(h).is_object(), "{h}");
        }
    }
}
