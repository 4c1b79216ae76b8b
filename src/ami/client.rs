//! The AMI client: connect, login, ActionID-matched actions, events to subscribers,
//! keepalive and reconnect. (Being built: issue 2.)
