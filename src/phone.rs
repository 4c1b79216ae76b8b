//! Phone number normalisation, used everywhere a number is compared or sent to a CRM.

/// Keep only the digits of a number as Asterisk or a person wrote it.
pub fn digits(raw: &str) -> String {
    raw.chars().filter(|c| c.is_ascii_digit()).collect()
}

/// The last 10 digits, which is how Kommo (and most people) match numbers.
pub fn last10(raw: &str) -> String {
    let d = digits(raw);
    let n = d.len();
    if n > 10 { d[n - 10..].to_string() } else { d }
}

/// How to turn a number as dialled in one country into international digits
/// (`[kommo.phone]`, `[bitrix24.phone]`). The defaults are Russia's: `8 916 123-45-67`,
/// `916 123 45 67` and `+7 916 123-45-67` all become `79161234567`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PhoneRules {
    /// Country calling code put in front of national numbers ("7").
    pub country_code: String,
    /// Trunk prefix that national numbers are dialled with ("8" in Russia, "0" in most
    /// of Europe); replaced by `country_code`. Empty: none.
    pub trunk_prefix: String,
    /// Digits in a national number without the trunk prefix (10 in Russia).
    pub national_length: usize,
    /// International call prefixes to strip ("00", "810").
    pub international_prefixes: Vec<String>,
}

impl Default for PhoneRules {
    fn default() -> Self {
        PhoneRules {
            country_code: "7".into(),
            trunk_prefix: "8".into(),
            national_length: 10,
            international_prefixes: vec!["810".into(), "00".into()],
        }
    }
}

/// International digits (no `+`) for a number as Asterisk gave it, by `rules`.
/// Numbers that fit no rule (short service numbers, foreign numbers already in
/// international form) keep their digits unchanged.
pub fn normalize(raw: &str, rules: &PhoneRules) -> String {
    let d = digits(raw);
    let plus = raw.trim_start().starts_with('+');
    if plus {
        return d;
    }
    for p in &rules.international_prefixes {
        if !p.is_empty() && d.len() > p.len() + 6 && d.starts_with(p.as_str()) {
            return d[p.len()..].to_string();
        }
    }
    let n = rules.national_length;
    if n > 0 && d.len() == n {
        return format!("{}{}", rules.country_code, d);
    }
    let tp = &rules.trunk_prefix;
    if !tp.is_empty() && d.len() == n + tp.len() && d.starts_with(tp.as_str()) {
        return format!("{}{}", rules.country_code, &d[tp.len()..]);
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn russian_formats_become_international() {
        let r = PhoneRules::default();
        for raw in [
            "79161234567",
            "+7 (916) 123-45-67",
            "89161234567",
            "9161234567",
            "8109161234567000",
        ] {
            let n = normalize(raw, &r);
            if raw.starts_with("810") {
                assert_eq!(n, "9161234567000");
            } else {
                assert_eq!(n, "79161234567", "{raw}");
            }
        }
        // short numbers and foreign international numbers are left alone
        assert_eq!(normalize("112", &r), "112");
        assert_eq!(normalize("+44 20 7946 0958", &r), "442079460958");
        assert_eq!(normalize("0044 20 7946 0958", &r), "442079460958");
    }

    #[test]
    fn other_country_rules() {
        let de = PhoneRules {
            country_code: "49".into(),
            trunk_prefix: "0".into(),
            national_length: 10,
            international_prefixes: vec!["00".into()],
        };
        assert_eq!(normalize("030 1234 5678", &de), "493012345678");
        assert_eq!(last10("+49 30 12345678"), "3012345678");
    }
}
