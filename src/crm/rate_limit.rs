//! A token bucket shared by the requests to one CRM account.
//!
//! Kommo allows 7 requests/s; Bitrix24 is a leaky bucket draining 2 requests/s that
//! blocks above 50 queued, which is the same as a bucket of 50 tokens refilled at 2/s.
//! A 429/503 with `Retry-After` pauses the whole bucket, not just one request.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    paused_until: Option<Instant>,
}

/// An async token bucket.
#[derive(Debug)]
pub struct RateLimiter {
    rate_per_sec: f64,
    burst: f64,
    bucket: Mutex<Bucket>,
}

impl RateLimiter {
    /// `rate_per_sec` tokens are added per second, up to `burst`.
    pub fn new(rate_per_sec: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        RateLimiter {
            rate_per_sec: rate_per_sec.max(0.001),
            burst,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                last: Instant::now(),
                paused_until: None,
            }),
        }
    }

    /// Whether at least `fraction` of the burst is free right now, without taking any:
    /// for optional requests that must not compete with the ones calls depend on.
    pub fn has_spare(&self, fraction: f64) -> bool {
        let Ok(b) = self.bucket.try_lock() else {
            return false;
        };
        let now = Instant::now();
        if b.paused_until.is_some_and(|u| u > now) {
            return false;
        }
        let elapsed = now.duration_since(b.last).as_secs_f64();
        let tokens = (b.tokens + elapsed * self.rate_per_sec).min(self.burst);
        tokens >= self.burst * fraction
    }

    /// Wait until one request may be sent.
    pub async fn acquire(&self) {
        loop {
            let wait = {
                let mut b = self.bucket.lock().await;
                let now = Instant::now();
                if let Some(until) = b.paused_until {
                    if until > now {
                        Some(until - now)
                    } else {
                        b.paused_until = None;
                        None
                    }
                } else {
                    None
                }
                .or_else(|| {
                    let elapsed = now.duration_since(b.last).as_secs_f64();
                    b.tokens = (b.tokens + elapsed * self.rate_per_sec).min(self.burst);
                    b.last = now;
                    if b.tokens >= 1.0 {
                        b.tokens -= 1.0;
                        None
                    } else {
                        Some(Duration::from_secs_f64(
                            (1.0 - b.tokens) / self.rate_per_sec,
                        ))
                    }
                })
            };
            match wait {
                None => return,
                Some(d) => tokio::time::sleep(d).await,
            }
        }
    }

    /// Stop all requests for `d` (the CRM said 429/503 with Retry-After).
    pub async fn pause_for(&self, d: Duration) {
        let mut b = self.bucket.lock().await;
        let until = Instant::now() + d;
        if b.paused_until.is_none_or(|u| u < until) {
            b.paused_until = Some(until);
        }
        b.tokens = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_steady_rate() {
        let rl = RateLimiter::new(2.0, 3);
        let start = Instant::now();
        for _ in 0..3 {
            rl.acquire().await;
        }
        assert!(start.elapsed() < Duration::from_millis(1));
        rl.acquire().await;
        rl.acquire().await;
        // two more tokens at 2/s take one second of (virtual) time
        let e = start.elapsed();
        assert!(
            e >= Duration::from_millis(990) && e <= Duration::from_millis(1100),
            "{e:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn spare_capacity_is_read_without_taking_tokens() {
        let rl = RateLimiter::new(2.0, 4);
        assert!(rl.has_spare(0.5), "a full bucket has room");
        for _ in 0..3 {
            rl.acquire().await;
        }
        // One token of four left: busy for optional work, yet still one request free.
        assert!(!rl.has_spare(0.5));
        assert!(rl.has_spare(0.25));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(rl.has_spare(0.5), "refilled to two of four");
        rl.pause_for(Duration::from_secs(5)).await;
        assert!(!rl.has_spare(0.0), "a paused bucket has nothing spare");
    }

    #[tokio::test(start_paused = true)]
    async fn pause_blocks_everyone() {
        let rl = RateLimiter::new(100.0, 10);
        rl.pause_for(Duration::from_secs(5)).await;
        let start = Instant::now();
        rl.acquire().await;
        assert!(start.elapsed() >= Duration::from_secs(5));
    }
}
