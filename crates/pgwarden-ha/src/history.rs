//! Availability from the cluster's history (pure): writes-unavailable time over a window,
//! MTTR and MTBF of the unplanned outages, availability = uptime / window.

use std::fmt::Write as _;

use pgwarden_dcs::{Event, EventKind};
use serde::Serialize;

/// What the history says of a window `[from_ms, to_ms)`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub from_ms: u64,
    pub to_ms: u64,
    /// Outages that overlap the window: all, and the unplanned ones (failovers, restarts).
    pub outages: usize,
    pub unplanned: usize,
    /// Writes-unavailable time inside the window: all outages, and the unplanned ones.
    pub downtime_ms: u64,
    pub unplanned_downtime_ms: u64,
    /// Percentage of the window in which the cluster took writes (planned outages count).
    pub availability_percent: f64,
    /// The same, counting only unplanned outages: MTBF / (MTBF + MTTR).
    pub unplanned_availability_percent: f64,
    /// Mean time to repair of the unplanned outages (`None`: there were none).
    pub mttr_ms: Option<u64>,
    /// Mean time between unplanned outages: the window's uptime over their count.
    pub mtbf_ms: Option<u64>,
}

/// The report for `[from_ms, to_ms)`.
pub fn report(events: &[Event], from_ms: u64, to_ms: u64) -> Report {
    let window = to_ms.saturating_sub(from_ms).max(1);
    let inside = |e: &Event| e.up_ms.min(to_ms).saturating_sub(e.down_ms.max(from_ms));
    let overlapping: Vec<&Event> = events
        .iter()
        .filter(|e| e.up_ms > from_ms && e.down_ms < to_ms)
        .collect();
    let unplanned: Vec<&&Event> = overlapping
        .iter()
        .filter(|e| e.kind != EventKind::Switchover)
        .collect();
    let downtime: u64 = overlapping.iter().map(|e| inside(e)).sum();
    let unplanned_downtime: u64 = unplanned.iter().map(|e| inside(e)).sum();
    let percent = |down: u64| 100.0 * (window.saturating_sub(down)) as f64 / window as f64;
    let n = unplanned.len() as u64;
    Report {
        from_ms,
        to_ms,
        outages: overlapping.len(),
        unplanned: unplanned.len(),
        downtime_ms: downtime,
        unplanned_downtime_ms: unplanned_downtime,
        availability_percent: percent(downtime),
        unplanned_availability_percent: percent(unplanned_downtime),
        mttr_ms: (n > 0).then(|| unplanned_downtime / n),
        mtbf_ms: (n > 0).then(|| window.saturating_sub(unplanned_downtime) / n),
    }
}

/// The events as a table, oldest first.
pub fn render(events: &[Event]) -> String {
    let mut s = format!(
        "{:<20} {:<10} {:<14} {:>5} {:>12} {:>10}\n",
        "when (UTC)", "kind", "leader", "epoch", "no writes", "lost"
    );
    for e in events {
        let when = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.down_ms),
        )
        .to_string();
        let kind = serde_json::to_value(e.kind)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "{:<20} {:<10} {:<14} {:>5} {:>11.2}s {:>10}",
            when.trim_end_matches('Z').replace('T', " "),
            kind,
            format!("{} -> {}", e.from.as_deref().unwrap_or("?"), e.to),
            e.epoch,
            e.duration_ms() as f64 / 1000.0,
            e.lost_bytes
                .map_or("?".into(), |b| pgwarden_core::ByteSize(b).to_string()),
        );
    }
    s
}

impl Report {
    /// The summary lines under the table.
    pub fn render(&self) -> String {
        let d = |ms: u64| pgwarden_core::format_duration(std::time::Duration::from_millis(ms));
        let mut s = format!(
            "over {}: {} outage(s), {} unplanned; writes unavailable {} ({} unplanned)\n",
            d(self.to_ms.saturating_sub(self.from_ms)),
            self.outages,
            self.unplanned,
            d(self.downtime_ms),
            d(self.unplanned_downtime_ms)
        );
        let _ = writeln!(
            s,
            "availability {:.5}% (unplanned only {:.5}%); MTTR {}; MTBF {}",
            self.availability_percent,
            self.unplanned_availability_percent,
            self.mttr_ms.map_or("-".into(), d),
            self.mtbf_ms.map_or("-".into(), d),
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, down_ms: u64, up_ms: u64) -> Event {
        Event {
            kind,
            down_ms,
            up_ms,
            detected_ms: None,
            promoted_ms: None,
            from: Some("n1".into()),
            to: "n2".into(),
            epoch: 2,
            timeline: None,
            lost_bytes: Some(0),
        }
    }

    #[test]
    fn reports() {
        use EventKind::*;
        let day = 86_400_000;
        #[rustfmt::skip]
        type Want = (usize, usize, u64, u64, Option<u64>, Option<u64>);
        let cases: Vec<(&str, Vec<Event>, Want)> = vec![
            ("nothing happened", vec![], (0, 0, 0, 0, None, None)),
            (
                "one failover of 2 s",
                vec![event(Failover, 1000, 3000)],
                (1, 1, 2000, 2000, Some(2000), Some(day - 2000)),
            ),
            (
                "a switchover is planned: no MTTR",
                vec![event(Switchover, 1000, 1500)],
                (1, 0, 500, 0, None, None),
            ),
            (
                "two unplanned",
                vec![event(Failover, 1000, 2000), event(Restart, 5000, 5300)],
                (2, 2, 1300, 1300, Some(650), Some((day - 1300) / 2)),
            ),
            (
                "clipped to the window",
                vec![event(Failover, day - 1000, day + 1000)],
                (1, 1, 1000, 1000, Some(1000), Some(day - 1000)),
            ),
            (
                "before the window",
                vec![event(Failover, 0, 0), event(Restart, day + 5, day + 10)],
                (0, 0, 0, 0, None, None),
            ),
        ];
        for (what, events, (outages, unplanned, down, udown, mttr, mtbf)) in cases {
            let r = report(&events, 0, day);
            assert_eq!(
                (
                    r.outages,
                    r.unplanned,
                    r.downtime_ms,
                    r.unplanned_downtime_ms,
                    r.mttr_ms,
                    r.mtbf_ms
                ),
                (outages, unplanned, down, udown, mttr, mtbf),
                "{what}"
            );
            let expect = 100.0 * (day - down) as f64 / day as f64;
            assert!((r.availability_percent - expect).abs() < 1e-9, "{what}");
            if let (Some(mttr), Some(mtbf)) = (r.mttr_ms, r.mtbf_ms) {
                // The theory's availability, for the unplanned outages.
                let theory = 100.0 * mtbf as f64 / (mtbf + mttr) as f64;
                assert!(
                    (r.unplanned_availability_percent - theory).abs() < 0.01,
                    "{what}: {theory}"
                );
            }
        }
        let text = report(&[event(Failover, 1000, 3000)], 0, day).render();
        assert!(text.contains("1 outage(s), 1 unplanned"), "{text}");
        assert!(text.contains("availability 99.99769%"), "{text}");
        let table = render(&[event(Failover, 1000, 3000)]);
        assert!(
            table.contains("1970-01-01 00:00:01  failover   n1 -> n2"),
            "{table}"
        );
        assert!(table.contains("2.00s"), "{table}");
    }
}
