//! Which offset may be stored per partition after a batch.
//!
//! The invariant: the offset stored for a partition is one past the highest
//! offset below which *every* record of that partition in the batch is
//! durably handled (appended to the outbox, produced to the dead-letter
//! topic, or deliberately skipped). A record that failed stops the
//! partition there: nothing at or above it is stored, and the consumer is
//! sent back to it (`seek`) so it is read again; records after it that did
//! make it into the outbox come back as duplicates and are absorbed by the
//! outbox's dedupe.

/// A topic and partition.
pub type Tp = (String, i32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    /// Lowest offset of the partition in the batch.
    first: i64,
    /// Highest offset seen (records arrive in offset order per partition).
    last: i64,
    /// Lowest offset that failed, if any.
    failed: Option<i64>,
    /// First hole between two records of the batch, if any.
    hole: Option<Gap>,
}

/// What to do for one partition once a batch is handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionOutcome {
    pub tp: Tp,
    /// Lowest offset of the partition in the batch.
    pub first: i64,
    /// First hole between two of the partition's records in the batch.
    pub hole: Option<Gap>,
    /// Offset to store (the next record to read), if there was progress.
    pub store: Option<i64>,
    /// Offset to seek back to, when a record failed.
    pub seek: Option<i64>,
    /// Records of the partition in the batch.
    pub records: u64,
}

/// Per-partition progress of one batch. Partitions are few per batch, so a
/// vector with linear lookup beats a map.
#[derive(Debug, Default)]
pub struct BatchOffsets {
    parts: Vec<(Tp, Progress, u64)>,
}

impl BatchOffsets {
    fn slot(&mut self, topic: &str, partition: i32, offset: i64) -> &mut (Tp, Progress, u64) {
        let i = match self
            .parts
            .iter()
            .position(|((t, p), _, _)| *p == partition && t == topic)
        {
            Some(i) => i,
            None => {
                self.parts.push((
                    (topic.to_string(), partition),
                    Progress {
                        first: offset,
                        last: offset,
                        failed: None,
                        hole: None,
                    },
                    0,
                ));
                self.parts.len() - 1
            }
        };
        &mut self.parts[i]
    }

    /// A record of the batch (handled successfully unless `fail`ed later).
    pub fn record(&mut self, topic: &str, partition: i32, offset: i64) {
        let (_, p, n) = self.slot(topic, partition, offset);
        *n += 1;
        if offset > p.last + 1 && p.hole.is_none() {
            p.hole = Some(Gap {
                expected: p.last + 1,
                next: offset,
            });
        }
        p.first = p.first.min(offset);
        p.last = p.last.max(offset);
    }

    /// The record at `offset` could not be handled.
    pub fn fail(&mut self, topic: &str, partition: i32, offset: i64) {
        let (_, p, _) = self.slot(topic, partition, offset);
        p.failed = Some(p.failed.map_or(offset, |f| f.min(offset)));
    }

    /// Every record of the batch failed (the outbox append failed).
    pub fn fail_all(&mut self) {
        for (_, p, _) in &mut self.parts {
            p.failed = Some(p.first);
        }
    }

    /// Whether the record at `offset` comes after a failure in its
    /// partition (so handling it now would be wasted: it is read again).
    pub fn blocked(&self, topic: &str, partition: i32, offset: i64) -> bool {
        self.parts
            .iter()
            .find(|((t, p), _, _)| *p == partition && t == topic)
            .and_then(|(_, p, _)| p.failed)
            .is_some_and(|f| offset >= f)
    }

    /// The outcome per partition, given the offsets seen in the batch.
    /// `offsets_of` lists the batch's offsets of a partition (to find the
    /// highest one below a failure).
    pub fn outcomes(&self, offsets_of: impl Fn(&Tp) -> Vec<i64>) -> Vec<PartitionOutcome> {
        self.parts
            .iter()
            .map(|(tp, p, n)| {
                let (store, seek) = match p.failed {
                    None => (Some(p.last + 1), None),
                    Some(f) => {
                        let below = offsets_of(tp).into_iter().filter(|o| *o < f).max();
                        (below.map(|o| o + 1), Some(f))
                    }
                };
                PartitionOutcome {
                    tp: tp.clone(),
                    first: p.first,
                    hole: p.hole,
                    store,
                    seek,
                    records: *n,
                }
            })
            .collect()
    }
}

/// A hole in a partition's offsets: the consumer expected `expected` next
/// and was handed `next` instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub expected: i64,
    pub next: i64,
}

impl PartitionOutcome {
    /// The first hole in the partition's offsets: between the offset
    /// expected next (`expected`: stored last, or committed) and the
    /// batch's first record, or between two records of the batch. Kafka
    /// allows holes (compaction, transaction markers); on a plain topic one
    /// means the broker skipped records.
    pub fn gap(&self, expected: Option<i64>) -> Option<Gap> {
        expected
            .filter(|e| self.first > *e)
            .map(|expected| Gap {
                expected,
                next: self.first,
            })
            .or(self.hole)
    }
}

impl PartitionOutcome {
    /// Whether going back to a failed record already covers `gap` (the
    /// failure is at or before the hole).
    pub fn failure_covers(&self, gap: Gap) -> bool {
        self.seek.is_some_and(|f| f <= gap.expected)
    }

    /// Store nothing at or past `gap`, whatever else the batch allowed;
    /// with `reread`, read the partition again from the hole, else stay
    /// there (no seek: the caller pauses the partition).
    pub fn stop_at(&mut self, gap: Gap, reread: bool) {
        self.store = if gap.expected > self.first {
            self.store.map(|s| s.min(gap.expected))
        } else {
            None
        };
        self.seek = reread.then_some(gap.expected);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gap of a batch of one partition with `offsets` (in order).
    fn first_gap(expected: Option<i64>, offsets: &[i64]) -> Option<Gap> {
        let mut b = BatchOffsets::default();
        for o in offsets {
            b.record("t", 0, *o);
        }
        outcomes(&b, &[]).first().and_then(|o| o.gap(expected))
    }

    #[test]
    fn gaps_are_found_before_the_batch_and_inside_it() {
        assert_eq!(first_gap(None, &[]), None);
        assert_eq!(first_gap(None, &[5, 6, 7]), None);
        assert_eq!(first_gap(Some(5), &[5, 6, 7]), None);
        // Re-reading from before the stored offset (a seek back) is no gap.
        assert_eq!(first_gap(Some(9), &[5, 6, 7]), None);
        assert_eq!(
            first_gap(Some(3), &[5, 6, 7]),
            Some(Gap {
                expected: 3,
                next: 5
            })
        );
        assert_eq!(
            first_gap(Some(5), &[5, 6, 9, 12]),
            Some(Gap {
                expected: 7,
                next: 9
            })
        );
        assert_eq!(
            first_gap(None, &[153, 179]),
            Some(Gap {
                expected: 154,
                next: 179
            })
        );
    }

    fn outcomes(b: &BatchOffsets, offsets: &[(&str, i32, i64)]) -> Vec<PartitionOutcome> {
        b.outcomes(|(t, p)| {
            offsets
                .iter()
                .filter(|(tt, pp, _)| tt == t && pp == p)
                .map(|(_, _, o)| *o)
                .collect()
        })
    }

    #[test]
    fn without_failures_the_next_offset_after_the_highest_is_stored() {
        let recs = [
            ("a", 0, 10),
            ("a", 1, 5),
            ("a", 0, 11),
            ("a", 0, 14),
            ("b", 0, 0),
        ];
        let mut b = BatchOffsets::default();
        for (t, p, o) in recs {
            b.record(t, p, o);
        }
        let out = outcomes(&b, &recs);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].tp, ("a".to_string(), 0));
        assert_eq!(
            (out[0].store, out[0].seek, out[0].records),
            (Some(15), None, 3)
        );
        assert_eq!((out[1].store, out[1].seek), (Some(6), None));
        assert_eq!((out[2].store, out[2].seek), (Some(1), None));
    }

    #[test]
    fn a_failure_stops_its_partition_there_and_only_there() {
        let recs = [
            ("a", 0, 10),
            ("a", 0, 11),
            ("a", 0, 12),
            ("a", 1, 3),
            ("a", 0, 13),
        ];
        let mut b = BatchOffsets::default();
        for (t, p, o) in recs {
            b.record(t, p, o);
        }
        b.fail("a", 0, 12);
        assert!(b.blocked("a", 0, 13));
        assert!(b.blocked("a", 0, 12));
        assert!(!b.blocked("a", 0, 11));
        assert!(!b.blocked("a", 1, 3));
        b.fail("a", 0, 13); // a later failure does not move the stop
        let out = outcomes(&b, &recs);
        assert_eq!((out[0].store, out[0].seek), (Some(12), Some(12)));
        assert_eq!((out[1].store, out[1].seek), (Some(4), None));
    }

    #[test]
    fn a_failure_on_the_first_record_stores_nothing_and_fail_all_rewinds_everything() {
        let recs = [("a", 0, 10), ("a", 0, 11), ("a", 1, 7)];
        let mut b = BatchOffsets::default();
        for (t, p, o) in recs {
            b.record(t, p, o);
        }
        b.fail("a", 0, 10);
        let out = outcomes(&b, &recs);
        assert_eq!((out[0].store, out[0].seek), (None, Some(10)));
        b.fail_all();
        let out = outcomes(&b, &recs);
        assert_eq!((out[0].store, out[0].seek), (None, Some(10)));
        assert_eq!((out[1].store, out[1].seek), (None, Some(7)));
    }

    #[test]
    fn a_hole_before_a_failed_record_is_not_hidden_by_the_failure() {
        // Offsets 10, 11, (hole 12..15), 15, 16, 17 failed.
        let mut b = BatchOffsets::default();
        for o in [10, 11, 15, 16, 17] {
            b.record("t", 0, o);
        }
        b.fail("t", 0, 17);
        let mut o = b.outcomes(|_| vec![10, 11, 15, 16, 17]).remove(0);
        assert_eq!((o.store, o.seek), (Some(17), Some(17)));
        let gap = o.gap(Some(10)).unwrap();
        assert_eq!(
            gap,
            Gap {
                expected: 12,
                next: 15
            }
        );
        // The failure is past the hole: it does not cover it...
        assert!(!o.failure_covers(gap));
        // ...so the partition stores only up to the hole and reads it again.
        o.stop_at(gap, true);
        assert_eq!((o.store, o.seek), (Some(12), Some(12)));
        // A failure at or before the hole covers it.
        let mut b = BatchOffsets::default();
        for o in [10, 11, 15] {
            b.record("t", 0, o);
        }
        b.fail("t", 0, 11);
        let o = b.outcomes(|_| vec![10, 11, 15]).remove(0);
        assert!(o.failure_covers(o.gap(Some(10)).unwrap()));
    }

    #[test]
    fn a_stall_stores_nothing_past_the_hole_and_does_not_seek() {
        // The batch starts past the hole (the group committed 50, the log
        // now starts at 80): nothing is stored at all.
        let mut b = BatchOffsets::default();
        for o in 80..100 {
            b.record("t", 0, o);
        }
        let mut o = b.outcomes(|_| (80..100).collect()).remove(0);
        let gap = o.gap(Some(50)).unwrap();
        o.stop_at(gap, false);
        assert_eq!((o.store, o.seek), (None, None));
    }
}
