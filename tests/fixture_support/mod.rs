//! What the recorded fixtures are, shared by the test files that replay all of them.

/// Every AMI fixture with calls, in recording order (14 holds protocol edge cases, no call).
pub const CALL_FIXTURES: &[&str] = &[
    "01-inbound-answered-recorded",
    "02-inbound-noanswer-missed",
    "03-inbound-busy",
    "04-inbound-ringgroup-102-answers",
    "05-inbound-queue-101-answers",
    "06-inbound-blind-transfer-101-to-102",
    "07-inbound-attended-transfer-101-to-102",
    "08-outbound-101-answered",
    "09-outbound-101-noanswer",
    "10-internal-101-to-102",
    "11-click-to-call-originate",
    "12-inbound-fastagi-autodistribution",
    "13-inbound-abandoned-while-ringing",
    "15-burst-20-concurrent",
    "16-inbound-blind-transfer-sip-refer",
    "17-inbound-queue-local-members-102-answers",
];
