//! In-memory index of ready events, rebuilt from disk at open.
//!
//! `claim_batch` must not scan the tree (with a million stored events that
//! would be seconds per claim), so we keep, per queue, the ready events in id
//! order. Only ids and times are kept (16 bytes per event), never payloads:
//! sizes are read with the records when a batch is built.

use std::collections::{HashMap, VecDeque};

use uuid::Uuid;

use super::types::ReadySummary;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadyEntry {
    pub id: u64,
    pub received_at_ms: u64,
}

#[derive(Debug, Default)]
pub(crate) struct ReadyIndex {
    queues: HashMap<Uuid, VecDeque<ReadyEntry>>,
    /// Stored events (sum of all queue lengths, `fresh` included).
    pub ready: u64,
    /// Events in persisted, unsettled batches.
    pub batched: u64,
    /// While the events stored before this run are still being loaded (in
    /// id order, in the background): events appended by this run (ids from
    /// `first_new_id` on) wait in `fresh`, invisible to `take` and
    /// `summary`, so nothing newer is batched ahead of an older event the
    /// load has not reached yet.
    loading: bool,
    first_new_id: u64,
    fresh: HashMap<Uuid, VecDeque<ReadyEntry>>,
}

impl ReadyIndex {
    pub fn depth(&self) -> u64 {
        self.ready + self.batched
    }

    /// Start a load: events with ids from `first_new_id` on are this run's.
    pub fn begin_loading(&mut self, first_new_id: u64) {
        self.loading = true;
        self.first_new_id = first_new_id;
    }

    /// The load is complete: this run's appends join their queues (their
    /// ids are above every loaded one).
    pub fn finish_loading(&mut self) {
        self.loading = false;
        for (queue_id, fresh) in self.fresh.drain() {
            self.queues.entry(queue_id).or_default().extend(fresh);
        }
    }

    /// Add a ready event, keeping id order (appends arrive in id order, so
    /// this is a push at the back except when claimed events are returned).
    pub fn push(&mut self, queue_id: Uuid, entry: ReadyEntry) {
        if self.loading && entry.id >= self.first_new_id {
            // Appends come in id order and cannot be taken while loading:
            // `fresh` stays sorted.
            self.fresh.entry(queue_id).or_default().push_back(entry);
            self.ready += 1;
            return;
        }
        let q = self.queues.entry(queue_id).or_default();
        match q.back() {
            Some(last) if last.id > entry.id => {
                let at = q.partition_point(|e| e.id < entry.id);
                q.insert(at, entry);
            }
            _ => q.push_back(entry),
        }
        self.ready += 1;
    }

    /// Take the oldest ready events of a queue, at most `max_cases`. Taken
    /// events count as batched; the caller gives back what does not fit its
    /// body ([`ReadyIndex::put_back`]).
    pub fn take(&mut self, queue_id: Uuid, max_cases: usize) -> Vec<ReadyEntry> {
        let Some(q) = self.queues.get_mut(&queue_id) else {
            return Vec::new();
        };
        let n = max_cases.min(q.len());
        let taken: Vec<ReadyEntry> = q.drain(..n).collect();
        if q.is_empty() {
            self.queues.remove(&queue_id);
        }
        let n = taken.len() as u64;
        self.ready -= n;
        self.batched += n;
        taken
    }

    /// Undo a `take` (the batch could not be persisted, or the events did
    /// not fit it).
    pub fn put_back(&mut self, queue_id: Uuid, entries: impl IntoIterator<Item = ReadyEntry>) {
        for e in entries {
            self.batched = self.batched.saturating_sub(1);
            self.push(queue_id, e);
        }
    }

    pub fn summary(&self) -> Vec<ReadySummary> {
        let mut out: Vec<ReadySummary> = self
            .queues
            .iter()
            .filter_map(|(queue_id, q)| {
                q.front().map(|first| ReadySummary {
                    queue_id: *queue_id,
                    count: q.len() as u64,
                    oldest_received_at_ms: first.received_at_ms,
                })
            })
            .collect();
        out.sort_by_key(|s| (s.oldest_received_at_ms, s.queue_id));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(id: u64) -> ReadyEntry {
        ReadyEntry {
            id,
            received_at_ms: id * 10,
        }
    }

    #[test]
    fn take_is_oldest_first_and_bounded() {
        let q = Uuid::new_v4();
        let mut ix = ReadyIndex::default();
        for id in [1, 2, 3, 4, 5] {
            ix.push(q, e(id));
        }
        let t = ix.take(q, 2);
        assert_eq!(t.iter().map(|e| e.id).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!((ix.ready, ix.batched, ix.depth()), (3, 2, 5));
        let t = ix.take(q, 2);
        assert_eq!(t.iter().map(|e| e.id).collect::<Vec<_>>(), vec![3, 4]);
        ix.put_back(q, t);
        assert_eq!(ix.summary()[0].oldest_received_at_ms, 30);
        assert_eq!(ix.summary()[0].count, 3);
    }

    #[test]
    fn while_loading_this_runs_appends_wait_behind_every_older_event() {
        let q = Uuid::new_v4();
        let mut ix = ReadyIndex::default();
        ix.begin_loading(100);
        ix.push(q, e(1));
        ix.push(q, e(100));
        ix.push(q, e(101));
        assert_eq!(ix.ready, 3);
        assert_eq!(ix.summary()[0].count, 1, "only loaded events are offered");
        let t = ix.take(q, 10);
        assert_eq!(t.iter().map(|e| e.id).collect::<Vec<_>>(), vec![1]);
        assert!(ix.take(q, 10).is_empty(), "fresh ones wait");
        ix.push(q, e(2)); // the load goes on
        ix.finish_loading();
        let t = ix.take(q, 10);
        assert_eq!(
            t.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![2, 100, 101]
        );
        assert_eq!((ix.ready, ix.batched), (0, 4));
    }

    #[test]
    fn a_partial_put_back_keeps_id_order() {
        let q = Uuid::new_v4();
        let mut ix = ReadyIndex::default();
        for id in [1, 2, 3] {
            ix.push(q, e(id));
        }
        let mut t = ix.take(q, 10);
        // The batch kept 1; 2 and 3 did not fit.
        let rest = t.split_off(1);
        ix.put_back(q, rest);
        ix.push(q, e(4));
        assert_eq!((ix.ready, ix.batched), (3, 1));
        let t = ix.take(q, 10);
        assert_eq!(t.iter().map(|e| e.id).collect::<Vec<_>>(), vec![2, 3, 4]);
        assert!(ix.summary().is_empty());
        assert!(ix.take(q, 10).is_empty());
    }
}
