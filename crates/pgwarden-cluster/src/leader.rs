//! Which primary the cluster's writes belong to, as a watcher of the nodes can tell it (the
//! monitor: no consensus store, something else promotes).
//!
//! The rule: a promoted node is followed only if it descends from the leader followed before
//! it. Its timeline history must leave that leader's timeline at or after the position seen on
//! the leader; otherwise writes acknowledged there would be missing on it, and writes are
//! refused instead (`follow_promotions = "any"` follows anyway). The position counted is the
//! one seen a round before the latest, taken only in rounds where every reachable replica was
//! streaming: a standby may trail by up to one round, and what the leader takes while a
//! standby is being promoted (it has stopped streaming) is not counted against that standby. A leader still up next to
//! a descendant is deposed; one next to a primary that does not descend from it keeps the
//! writes. The decision is pure and tested table by table; the monitor does the I/O.

pub use pgwarden_config::FollowPromotions as Policy;
use pgwarden_core::Lsn;

/// One line of a timeline history file: the timeline was left at `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    pub timeline: u32,
    pub at: Lsn,
}

/// Reads a `0000000N.history` file: `parentTLI <tab> switchpoint <tab> reason` per line;
/// blank lines and `#` comments are skipped.
pub fn parse_history(text: &str) -> Result<Vec<Switch>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let bad = || format!("timeline history line {}: {line:?}", i + 1);
        let timeline = fields.next().and_then(|t| t.parse().ok()).ok_or_else(bad)?;
        let at = fields.next().and_then(|l| l.parse().ok()).ok_or_else(bad)?;
        out.push(Switch { timeline, at });
    }
    Ok(out)
}

/// A node that reports itself primary.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub name: String,
    pub timeline: u32,
    /// Its current WAL position.
    pub lsn: Lsn,
    /// Its timeline's history (empty on timeline 1); `Err`: it could not be read.
    pub history: Result<Vec<Switch>, String>,
}

/// The leader last followed, and the position counted as seen on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Followed {
    pub name: String,
    pub timeline: u32,
    /// What a promoted node must hold to descend from this leader.
    pub lsn: Lsn,
    /// The latest sample, counted from the next settled round on.
    pub latest: Lsn,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Index into the candidates.
    pub leader: Option<usize>,
    /// Why each primary that is not followed is not, one line each.
    pub refused: Vec<String>,
}

/// Decides who takes writes among the nodes that say they are primary.
pub fn decide(last: Option<&Followed>, primaries: &[Candidate], policy: Policy) -> Decision {
    let last = match (policy, last) {
        (Policy::Descendant, Some(l)) => l,
        _ => return newest(primaries),
    };
    let current = primaries
        .iter()
        .position(|c| c.name == last.name && c.timeline == last.timeline);
    let descendants: Vec<usize> = (0..primaries.len())
        .filter(|&i| Some(i) != current && descends(last, &primaries[i]).is_ok())
        .collect();
    let top = descendants.iter().map(|&i| primaries[i].timeline).max();
    let on_top: Vec<usize> = descendants
        .iter()
        .copied()
        .filter(|&i| Some(primaries[i].timeline) == top)
        .collect();
    let leader = match on_top.as_slice() {
        [one] => Some(*one),
        [] => current,
        _ => None,
    };
    let mut refused = Vec::new();
    for (i, c) in primaries.iter().enumerate() {
        if Some(i) == leader {
            continue;
        }
        let why = if Some(i) == current {
            match leader {
                Some(l) => format!(
                    "{} (timeline {}) was deposed by {} (timeline {})",
                    c.name, c.timeline, primaries[l].name, primaries[l].timeline
                ),
                None => format!("{} is deposed", c.name),
            }
        } else if on_top.len() > 1 && on_top.contains(&i) {
            format!(
                "{} (timeline {}): several primaries descend from {} on the same timeline; none is followed",
                c.name, c.timeline, last.name
            )
        } else {
            match descends(last, c) {
                Err(e) => e,
                Ok(()) => format!(
                    "{} (timeline {}) descends from {} but a newer descendant leads",
                    c.name, c.timeline, last.name
                ),
            }
        };
        refused.push(why);
    }
    Decision { leader, refused }
}

/// Whether `c` holds everything seen on `last`: its history leaves `last`'s timeline at or
/// after the position last seen there.
pub fn descends(last: &Followed, c: &Candidate) -> Result<(), String> {
    let head = format!(
        "{} (timeline {}) does not descend from {} (timeline {}, seen at {})",
        c.name, c.timeline, last.name, last.timeline, last.lsn
    );
    if c.timeline <= last.timeline {
        return Err(format!("{head}: it is not on a newer timeline"));
    }
    let history = c
        .history
        .as_ref()
        .map_err(|e| format!("{head}: its timeline history could not be read ({e})"))?;
    match history.iter().find(|s| s.timeline == last.timeline) {
        Some(s) if s.at >= last.lsn => Ok(()),
        Some(s) => Err(format!(
            "{head}: it left timeline {} at {}, so {} bytes written there are missing on it",
            last.timeline,
            s.at,
            last.lsn.bytes_since(s.at)
        )),
        None => Err(format!(
            "{head}: its history has no record of timeline {}",
            last.timeline
        )),
    }
}

/// Without a previous leader: the only primary, or the only one on the newest timeline.
fn newest(primaries: &[Candidate]) -> Decision {
    let top = primaries.iter().map(|c| c.timeline).max();
    let on_top: Vec<usize> = (0..primaries.len())
        .filter(|&i| Some(primaries[i].timeline) == top)
        .collect();
    let leader = (on_top.len() == 1).then(|| on_top[0]);
    let refused = primaries
        .iter()
        .enumerate()
        .filter(|&(i, _)| Some(i) != leader)
        .map(|(_, c)| match leader {
            Some(l) => format!(
                "{} (timeline {}) is older than {} (timeline {})",
                c.name, c.timeline, primaries[l].name, primaries[l].timeline
            ),
            None => format!(
                "{} (timeline {}): several primaries on the same timeline; none is followed",
                c.name, c.timeline
            ),
        })
        .collect();
    Decision { leader, refused }
}

/// The leader followed after a decision, or the previous one kept (with what was seen on it)
/// while nobody is followed. `settled`: every reachable replica streams (nobody is being
/// promoted); only then does the position counted advance, to the previous round's sample.
pub fn followed_after(
    last: Option<&Followed>,
    primaries: &[Candidate],
    decision: &Decision,
    settled: bool,
) -> Option<Followed> {
    let Some(i) = decision.leader else {
        return last.cloned();
    };
    let c = &primaries[i];
    let same = last.filter(|l| l.name == c.name && l.timeline == c.timeline);
    let (lsn, latest) = match same {
        Some(l) if settled => (l.lsn.max(l.latest), l.latest.max(c.lsn)),
        Some(l) => (l.lsn, l.latest),
        // A new leader: its history already holds everything counted before it.
        None => (Lsn(0), c.lsn),
    };
    Some(Followed {
        name: c.name.clone(),
        timeline: c.timeline,
        lsn,
        latest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(s: &str) -> Lsn {
        s.parse().expect("lsn")
    }

    fn cand(name: &str, timeline: u32, at: &str, history: &[(u32, &str)]) -> Candidate {
        Candidate {
            name: name.into(),
            timeline,
            lsn: lsn(at),
            history: Ok(history
                .iter()
                .map(|&(timeline, at)| Switch {
                    timeline,
                    at: lsn(at),
                })
                .collect()),
        }
    }

    fn followed(name: &str, timeline: u32, at: &str) -> Followed {
        Followed {
            name: name.into(),
            timeline,
            lsn: lsn(at),
            latest: lsn(at),
        }
    }

    #[test]
    fn history_files_parse_as_postgres_writes_them() {
        let text =
            "1\t0/3000148\tno recovery target specified\n\n2\t0/5000000\tbefore 2026-01-01\n";
        assert_eq!(
            parse_history(text),
            Ok(vec![
                Switch {
                    timeline: 1,
                    at: lsn("0/3000148")
                },
                Switch {
                    timeline: 2,
                    at: lsn("0/5000000")
                },
            ])
        );
        assert_eq!(parse_history("# comment\n"), Ok(vec![]));
        assert!(parse_history("x\t0/1\n").is_err());
        assert!(parse_history("1\tnot-an-lsn\n").is_err());
    }

    #[test]
    fn who_takes_writes() {
        use Policy::*;
        let n1 = followed("n1", 1, "0/5000000");
        let n2_tl2 = followed("n2", 2, "0/9000000");
        // (what was followed, primaries seen, policy, leader's name or none, refused count)
        type Case = (
            &'static str,
            Option<Followed>,
            Vec<Candidate>,
            Policy,
            Option<&'static str>,
            usize,
        );
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            ("first view: the only primary", None, vec![cand("n1", 1, "0/1", &[])], Descendant, Some("n1"), 0),
            ("first view: newest timeline", None, vec![cand("n1", 1, "0/1", &[]), cand("n2", 2, "0/1", &[(1, "0/1")])], Descendant, Some("n2"), 1),
            ("first view: two on one timeline", None, vec![cand("n1", 2, "0/1", &[]), cand("n2", 2, "0/1", &[])], Descendant, None, 2),
            ("nobody primary", Some(n1.clone()), vec![], Descendant, None, 0),
            ("the leader stays", Some(n1.clone()), vec![cand("n1", 1, "0/6000000", &[])], Descendant, Some("n1"), 0),
            ("promotion at the last position seen", Some(n1.clone()), vec![cand("n2", 2, "0/5000000", &[(1, "0/5000000")])], Descendant, Some("n2"), 0),
            ("promotion past it", Some(n1.clone()), vec![cand("n2", 2, "0/5000100", &[(1, "0/5000100")])], Descendant, Some("n2"), 0),
            ("promotion before it: writes would be lost", Some(n1.clone()), vec![cand("n2", 2, "0/4000000", &[(1, "0/4000000")])], Descendant, None, 1),
            ("the same, with any", Some(n1.clone()), vec![cand("n2", 2, "0/4000000", &[(1, "0/4000000")])], Any, Some("n2"), 0),
            ("old leader up, a descendant promoted: deposed", Some(n1.clone()), vec![cand("n1", 1, "0/5000010", &[]), cand("n2", 2, "0/5000000", &[(1, "0/5000000")])], Descendant, Some("n2"), 1),
            ("old leader up, a lagging node promoted: the leader keeps writes", Some(n1.clone()), vec![cand("n1", 1, "0/5000010", &[]), cand("n2", 2, "0/4000000", &[(1, "0/4000000")])], Descendant, Some("n1"), 1),
            ("two promotions on one timeline: the followed one keeps writes", Some(n2_tl2.clone()), vec![cand("n2", 2, "0/9000000", &[(1, "0/5000000")]), cand("n3", 2, "0/5000000", &[(1, "0/5000000")])], Descendant, Some("n2"), 1),
            ("then the followed one dies: the other is not followed", Some(n2_tl2.clone()), vec![cand("n3", 2, "0/5000000", &[(1, "0/5000000")])], Descendant, None, 1),
            ("the same, with any", Some(n2_tl2.clone()), vec![cand("n3", 2, "0/5000000", &[(1, "0/5000000")])], Any, Some("n3"), 0),
            ("a node promoted twice descends through its history", Some(n1.clone()), vec![cand("n3", 3, "0/7000000", &[(1, "0/5000000"), (2, "0/6000000")])], Descendant, Some("n3"), 0),
            ("a history without the leader's timeline", Some(n2_tl2.clone()), vec![cand("n3", 3, "0/9000000", &[(1, "0/5000000")])], Descendant, None, 1),
            ("an unreadable history is not trusted", Some(n1.clone()), vec![Candidate { history: Err("permission denied".into()), ..cand("n2", 2, "0/6000000", &[]) }], Descendant, None, 1),
            ("two descendants on one timeline: none", Some(n1.clone()), vec![cand("n2", 2, "0/6000000", &[(1, "0/5000000")]), cand("n3", 2, "0/6000000", &[(1, "0/5000000")])], Descendant, None, 2),
            ("two descendants: the newest timeline", Some(n1.clone()), vec![cand("n2", 2, "0/6000000", &[(1, "0/5000000")]), cand("n3", 3, "0/7000000", &[(1, "0/5000000"), (2, "0/6000000")])], Descendant, Some("n3"), 1),
            ("the leader restarted in place on its timeline", Some(n1.clone()), vec![cand("n1", 1, "0/5000000", &[])], Descendant, Some("n1"), 0),
            ("the leader back on an older timeline is not it", Some(n2_tl2.clone()), vec![cand("n2", 1, "0/9000000", &[])], Descendant, None, 1),
        ];
        for (what, last, primaries, policy, want, refused) in cases {
            let d = decide(last.as_ref(), &primaries, policy);
            let got = d.leader.map(|i| primaries[i].name.as_str());
            assert_eq!(got, want, "{what}: {d:?}");
            assert_eq!(d.refused.len(), refused, "{what}: {:?}", d.refused);
        }
    }

    #[test]
    fn refusals_say_what_would_be_lost() {
        let last = followed("n1", 1, "0/5000000");
        let d = decide(
            Some(&last),
            &[cand("n2", 2, "0/4000000", &[(1, "0/4000000")])],
            Policy::Descendant,
        );
        assert_eq!(
            d.refused,
            vec!["n2 (timeline 2) does not descend from n1 (timeline 1, seen at 0/5000000): it left timeline 1 at 0/4000000, so 16777216 bytes written there are missing on it".to_string()]
        );
    }

    #[test]
    fn what_is_followed_next() {
        let at = |l: &Followed| (l.lsn.to_string(), l.latest.to_string());
        let last = followed("n1", 1, "0/5000000");
        let next = |last: &Followed, sample: &str, settled: bool| {
            let primaries = [cand("n1", 1, sample, &[])];
            let d = decide(Some(last), &primaries, Policy::Descendant);
            followed_after(Some(last), &primaries, &d, settled).expect("followed")
        };
        // Settled rounds count the previous round's sample.
        let r1 = next(&last, "0/6000000", true);
        assert_eq!(at(&r1), ("0/5000000".into(), "0/6000000".into()));
        let r2 = next(&r1, "0/7000000", true);
        assert_eq!(at(&r2), ("0/6000000".into(), "0/7000000".into()));
        // A round where a standby stopped streaming (being promoted?) counts nothing new.
        let r3 = next(&r2, "0/8000000", false);
        assert_eq!(at(&r3), at(&r2));
        // Positions never go back.
        let r4 = next(&r3, "0/1000000", true);
        assert_eq!(at(&r4), ("0/7000000".into(), "0/7000000".into()));
        // Nobody followed: the last leader is kept.
        let none = Decision {
            leader: None,
            refused: vec![],
        };
        assert_eq!(
            followed_after(Some(&r4), &[], &none, true),
            Some(r4.clone())
        );
        // A new leader starts from its own position.
        let moved = [cand("n2", 2, "0/9000000", &[(1, "0/7000000")])];
        let d = decide(Some(&r4), &moved, Policy::Descendant);
        let n2 = followed_after(Some(&r4), &moved, &d, true).expect("n2");
        assert_eq!(n2.name, "n2");
        assert_eq!(at(&n2), ("0/0".into(), "0/9000000".into()));
    }
}
