//! Each method against its formula, step by step, on samples stamped by the test.

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn sample(latency_ms: u64, in_flight: u32, dropped: bool) -> Sample {
    Sample {
        at: Timestamp::from_micros(0),
        latency: ms(latency_ms),
        in_flight,
        dropped,
    }
}

#[test]
fn gradient_grows_by_its_queue_while_latency_holds_and_shrinks_by_the_gradient() {
    let method = Method::Gradient2 {
        tolerance: 1.5,
        smoothing: 1.0,
        long_window: 100,
    };
    let mut c = ConcurrencyLimit::new(method, 16, 1, 1000);
    // Steady latency: gradient 1 (clamped), new = 16 × 1 + √16 = 20.
    c.record(sample(10, 16, false));
    assert_eq!(c.limit(), 20);
    // Latency doubles: long ≈ (10 + 20) / 2 = 15; gradient = 1.5 × 15 ÷ 20 = 1.125 → 1.
    c.record(sample(20, 20, false));
    assert_eq!(c.limit(), 24, "20 × 1 + √20 = 24.47");
    // Latency far above the long-term one: the limit shrinks by the gradient.
    let before = c.limit;
    c.record(sample(400, 24, false));
    let long = 15_000.0 + (400_000.0 - 15_000.0) / 3.0;
    let gradient: f64 = (1.5 * long / 400_000.0_f64).clamp(0.5, 1.0);
    let expected = before * gradient + before.sqrt();
    assert!(
        (c.limit - expected).abs() < 1e-9,
        "{} ≠ {expected}",
        c.limit
    );
    assert_eq!(c.limit(), 18, "it shrank, by the gradient");
    // Ten times slower than ever: the gradient clamps at 0.5.
    let mut d = ConcurrencyLimit::new(method, 100, 1, 1000);
    for _ in 0..10 {
        d.record(sample(10, 1000, false));
    }
    let before = d.limit;
    d.record(sample(1_000, 1000, false));
    assert!((d.limit - (before * 0.5 + before.sqrt())).abs() < 1e-9);
}

#[test]
fn gradient_measures_the_no_load_latency_then_moves_by_envoys_formula_each_interval() {
    let method = Method::Gradient {
        tolerance: 1.25,
        smoothing: 1.0,
        percentile: 0.5,
        interval: ms(100),
        min_rtt_every: Duration::from_secs(30),
        min_rtt_requests: 5,
        min_concurrency: 3,
    };
    let t0 = 1_700_000_000_000_000u64;
    let at = |ms: u64| Timestamp::from_micros(t0 + ms * 1_000);
    let end = |t: u64, latency: u64, in_flight: u32, dropped: bool| Sample {
        at: at(t),
        latency: self::ms(latency),
        in_flight,
        dropped,
    };
    let mut c = ConcurrencyLimit::new(method, 40, 1, 1000);
    assert_eq!(c.limit(), 3, "held at min_concurrency while it measures");
    // Requests sent at a higher concurrency (before the measurement) do not count.
    c.record(end(1, 50, 40, false));
    for (i, latency) in [6, 5, 5, 9, 7].into_iter().enumerate() {
        c.record(end(2 + i as u64, latency, 3, false));
    }
    assert_eq!(
        c.baseline,
        Some(5_000.0),
        "the lowest decile of 6, 5, 5, 9, 7 ms"
    );
    assert_eq!(c.limit(), 40, "back to where it was");
    // The first sample opens the interval; the first one past its end closes it.
    c.record(end(10, 10, 40, false));
    c.record(end(50, 10, 40, false));
    c.record(end(60, 20, 40, false));
    // The sample that closes an interval belongs to the next one.
    c.record(end(111, 1, 40, false));
    // The interval's median (its `percentile` here) is 10 ms: gradient = 5 × 1.25 ÷ 10 =
    // 0.625; 40 × 0.625 + √40 = 31.32.
    let expected = 40.0 * 0.625 + 40f64.sqrt();
    assert!((c.limit - expected).abs() < 1e-9, "{}", c.limit);
    // Faster than the no-load latency (1 ms): the gradient is capped at 2.
    c.record(end(212, 1, 31, true));
    let before = expected;
    let expected = before * 2.0 + before.sqrt();
    assert!((c.limit - expected).abs() < 1e-9, "{}", c.limit);
    // An interval with an overload failure: gradient 0.5, whatever the latencies.
    c.record(end(250, 1, 31, false));
    c.record(end(313, 1, 31, false));
    let before = expected;
    let expected = before * 0.5 + before.sqrt();
    assert!((c.limit - expected).abs() < 1e-9, "{}", c.limit);
    // 30 s on (plus up to 15 %), an interval's end starts a new measurement.
    c.record(end(35_000, 5, 10, false));
    assert_eq!(c.limit(), 3, "measuring again");
}

#[test]
fn gradient_moves_by_its_smoothing() {
    let method = Method::Gradient {
        tolerance: 1.0,
        smoothing: 0.2,
        percentile: 0.5,
        interval: ms(100),
        min_rtt_every: Duration::from_secs(30),
        min_rtt_requests: 1,
        min_concurrency: 3,
    };
    let at = |ms: u64| Timestamp::from_micros(1_000_000 + ms * 1_000);
    let mut c = ConcurrencyLimit::new(method, 100, 1, 1000);
    let end = |t: u64, latency: u64, in_flight: u32| Sample {
        at: at(t),
        latency: self::ms(latency),
        in_flight,
        dropped: false,
    };
    c.record(end(0, 10, 1));
    c.record(end(1, 20, 100));
    c.record(end(102, 20, 100));
    // gradient 0.5: target 50 + 10 = 60; a fifth of the way from 100: 92.
    assert!((c.limit - 92.0).abs() < 1e-9, "{}", c.limit);
}

#[test]
fn gradient_learns_nothing_when_the_application_is_the_limit() {
    let method = Method::Gradient2 {
        tolerance: 1.5,
        smoothing: 0.2,
        long_window: 600,
    };
    let mut c = ConcurrencyLimit::new(method, 40, 10, 200);
    for _ in 0..100 {
        c.record(sample(5, 3, false));
    }
    assert_eq!(c.limit(), 40, "3 in flight of 40: nothing learnt");
}

#[test]
fn gradient_smooths_and_stays_within_its_bounds() {
    let method = Method::Gradient2 {
        tolerance: 1.5,
        smoothing: 0.2,
        long_window: 600,
    };
    let mut c = ConcurrencyLimit::new(method, 20, 10, 30);
    for _ in 0..200 {
        c.record(sample(5, 30, false));
    }
    assert_eq!(c.limit(), 30, "capped at max");
    // A sudden slowdown moves it a fifth of the way to `30 × 0.5 + √30`.
    c.record(sample(5_000, 30, false));
    let expected = 30.0 * 0.8 + (15.0 + 30f64.sqrt()) * 0.2;
    assert!((c.limit - expected).abs() < 1e-9, "{}", c.limit);
    let mut d = ConcurrencyLimit::new(method, 12, 10, 30);
    for _ in 0..50 {
        d.record(sample(5, 12, false));
    }
    for _ in 0..50 {
        d.record(sample(5_000, 30, false));
    }
    assert!(d.limit() >= 10, "never under min: {}", d.limit);
}

#[test]
fn aimd_backs_off_on_drops_and_timeouts_and_adds_one_when_busy() {
    let method = Method::Aimd {
        backoff: 0.9,
        timeout: ms(100),
    };
    let mut c = ConcurrencyLimit::new(method, 20, 5, 100);
    c.record(sample(10, 10, false));
    assert_eq!(c.limit(), 21, "half in flight: + 1");
    c.record(sample(10, 5, false));
    assert_eq!(c.limit(), 21, "under half: unchanged");
    c.record(sample(10, 21, true));
    assert_eq!(c.limit(), 18, "21 × 0.9 = 18.9");
    c.record(sample(150, 18, false));
    assert_eq!(
        c.limit(),
        17,
        "a timeout counts as a drop: 18.9 × 0.9 = 17.01"
    );
    for _ in 0..50 {
        c.record(sample(10, 1, true));
    }
    assert_eq!(c.limit(), 5, "floored at min");
}

#[test]
fn vegas_grows_on_a_short_queue_and_shrinks_on_a_long_one() {
    let method = Method::Vegas {
        alpha: 3.0,
        beta: 6.0,
    };
    let mut c = ConcurrencyLimit::new(method, 100, 1, 1000);
    // The first sample sets the no-load latency: queue 0 < 3 × log10(100) = 6 → + 2.
    c.record(sample(10, 100, false));
    assert_eq!(c.limit(), 102);
    // 13 ms against 10 ms no-load: queue = ceil(102 × 0.23) = 24 > 6 × log10(102) → − 2.
    c.record(sample(13, 102, false));
    assert_eq!(c.limit(), 99);
    // A drop shrinks it too.
    c.record(sample(10, 99, true));
    assert_eq!(c.limit(), 97);
}

#[test]
fn admission_control_refuses_by_envoys_formula_and_stops_when_failures_stop() {
    let t0 = 1_700_000_000_000_000;
    let at = |ms: u64| Timestamp::from_micros(t0 + ms * 1000);
    let mut a = AdmissionControl::new(Duration::from_secs(10), 0.95, 1.0, 0.8, 20);
    // 19 requests: under the minimum, nothing refused whatever they did.
    for i in 0..19 {
        a.record(at(i), false);
    }
    assert_eq!(a.reject_probability(at(20)), 0.0);
    // 100 requests, 50 successes: (100 − 50 ÷ 0.95) ÷ 101 = 0.4690…
    let mut a = AdmissionControl::new(Duration::from_secs(10), 0.95, 1.0, 0.8, 20);
    for i in 0..100 {
        a.record(at(i), i % 2 == 0);
    }
    let p = a.reject_probability(at(100));
    assert!((p - (100.0 - 50.0 / 0.95) / 101.0).abs() < 1e-12, "{p}");
    // Aggression 2: the square root.
    let mut b = AdmissionControl::new(Duration::from_secs(10), 0.95, 2.0, 0.8, 20);
    for i in 0..100 {
        b.record(at(i), i % 2 == 0);
    }
    assert!((b.reject_probability(at(100)) - p.sqrt()).abs() < 1e-12);
    // All failing: capped.
    let mut c = AdmissionControl::new(Duration::from_secs(10), 0.95, 1.0, 0.8, 20);
    for i in 0..100 {
        c.record(at(i), false);
    }
    assert_eq!(c.reject_probability(at(100)), 0.8);
    // Healthy traffic: nothing refused (successes ÷ threshold ≥ requests).
    let mut d = AdmissionControl::new(Duration::from_secs(10), 0.95, 1.0, 0.8, 20);
    for i in 0..100 {
        d.record(at(i), i % 50 != 0);
    }
    assert_eq!(d.reject_probability(at(100)), 0.0, "98 % success");
    // Once the failures leave the window, refusals stop.
    assert_eq!(c.reject_probability(at(10_500)), 0.0);
    // While the window slides, only what is in it counts: 100 failures, then 1,000
    // successes a second later, then the failures out of the window.
    let mut e = AdmissionControl::new(Duration::from_secs(10), 0.95, 1.0, 0.8, 20);
    for i in 0..100 {
        e.record(at(i), false);
    }
    for i in 0..1000 {
        e.record(at(1_000 + i), true);
    }
    let p = e.reject_probability(at(2_000));
    assert!((p - (1100.0 - 1000.0 / 0.95) / 1101.0).abs() < 1e-12, "{p}");
    assert_eq!(
        e.reject_probability(at(10_500)),
        0.0,
        "the failures left the window"
    );
}
