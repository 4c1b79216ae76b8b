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
