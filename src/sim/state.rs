//! In-memory state of the simulator: cases, per-queue indexes, the agent's
//! agenda, idempotency records and counters.
//!
//! Everything a create touches is O(log n) per case: a hash insert, inserts
//! into the queue's created_at and updated_at indexes and a push on the
//! agenda heap. A listing walks one queue's index from its `*_from` bound.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, SubsecRound, Utc};
use tokio::time::Instant;
use uuid::Uuid;

use crate::duvo::types::{Case, CaseList, CaseStatus, NewCase, Priority, SortBy, SortOrder};

/// Lock a mutex, recovering from poisoning: a panicking request must not take
/// the whole simulator down with it, and all invariants here are restored
/// before any code that could panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Wall-clock now, truncated to microseconds so a timestamp the client
/// echoes back (RFC 3339 with micros) compares equal to the stored one.
pub(crate) fn now_utc() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// Step the simulated agent takes when an agenda entry falls due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Step {
    Claim,
    Finish,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Due {
    pub at: Instant,
    /// Insertion sequence: keeps the order FIFO for equal instants.
    pub seq: u64,
    pub id: Uuid,
    pub step: Step,
}

/// Filters, sort and page of a list or search request, already validated.
#[derive(Debug, Clone)]
pub(crate) struct ListParams {
    pub statuses: Vec<CaseStatus>,
    /// Lower-cased search needle.
    pub search: Option<String>,
    pub created_at_from: Option<DateTime<Utc>>,
    pub updated_at_from: Option<DateTime<Utc>>,
    pub sort_by: SortBy,
    pub sort_order: SortOrder,
    pub limit: u32,
    pub offset: u64,
}

/// Outcome of a bulk retry for one id.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct RetrySkip {
    pub id: Uuid,
    pub reason: String,
}

/// The case store. Guarded by one mutex in [`super::SimState`].
#[derive(Debug, Default)]
pub(crate) struct Store {
    cases: HashMap<Uuid, Case>,
    /// Every case id in creation order (for `/_sim/cases` and snapshots).
    order: Vec<Uuid>,
    /// Per queue, (created_at, id) and (updated_at, id) in order: a listing
    /// sorted by either reads only the range its `*_from` filter leaves,
    /// not every case of the queue (a million-case soak lists in
    /// microseconds, as a real database with indexes would).
    by_created: HashMap<Uuid, BTreeSet<(DateTime<Utc>, Uuid)>>,
    by_updated: HashMap<Uuid, BTreeSet<(DateTime<Utc>, Uuid)>>,
    status_counts: BTreeMap<CaseStatus, u64>,
    agenda: BinaryHeap<Reverse<Due>>,
    seq: u64,
}

impl Store {
    pub fn new() -> Self {
        let mut s = Store::default();
        for st in [
            CaseStatus::Pending,
            CaseStatus::Claimed,
            CaseStatus::Completed,
            CaseStatus::Failed,
            CaseStatus::Canceled,
        ] {
            s.status_counts.insert(st, 0);
        }
        s
    }

    fn schedule(&mut self, at: Instant, id: Uuid, step: Step) {
        self.seq += 1;
        self.agenda.push(Reverse(Due {
            at,
            seq: self.seq,
            id,
            step,
        }));
    }

    fn set_status(&mut self, from: CaseStatus, to: CaseStatus) {
        if let Some(c) = self.status_counts.get_mut(&from) {
            *c = c.saturating_sub(1);
        }
        *self.status_counts.entry(to).or_insert(0) += 1;
    }

    /// Create the cases (in request order) and schedule their claim.
    pub fn commit(&mut self, queue: Uuid, new: Vec<NewCase>, claim_at: Instant) -> Vec<Case> {
        let now = now_utc();
        let mut out = Vec::with_capacity(new.len());
        for n in new {
            let case = Case {
                id: Uuid::new_v4(),
                queue_id: queue,
                title: n.title,
                data: n.data,
                status: CaseStatus::Pending,
                labels: n.labels,
                priority: Some(n.priority.unwrap_or(Priority::None)),
                claimed_at: None,
                claimed_by_run_id: None,
                completed_at: None,
                postponed_to: None,
                pending_human_request_id: None,
                agent_run_status: None,
                created_at: now,
                updated_at: now,
            };
            let id = case.id;
            self.cases.insert(id, case.clone());
            self.order.push(id);
            self.by_created.entry(queue).or_default().insert((now, id));
            self.by_updated.entry(queue).or_default().insert((now, id));
            *self.status_counts.entry(CaseStatus::Pending).or_insert(0) += 1;
            self.schedule(claim_at, id, Step::Claim);
            out.push(case);
        }
        out
    }

    /// Apply agenda entries due at or before `now`, at most `budget` of them
    /// (so the lock is never held for long). Returns when the agent should
    /// look again: `Some(now)` if more are already due, the next due instant,
    /// or `None` when the agenda is empty.
    pub fn run_due(
        &mut self,
        now: Instant,
        finish_after: Duration,
        fail: &dyn Fn(&Case) -> bool,
        budget: usize,
    ) -> Option<Instant> {
        let wall = now_utc();
        for _ in 0..budget {
            let Reverse(due) = self.agenda.peek().copied()?;
            if due.at > now {
                return Some(due.at);
            }
            self.agenda.pop();
            let Some(case) = self.cases.get_mut(&due.id) else {
                continue;
            };
            let from = case.status;
            match (due.step, from) {
                (Step::Claim, CaseStatus::Pending) => {
                    case.status = CaseStatus::Claimed;
                    case.claimed_at = Some(wall);
                    case.claimed_by_run_id = Some(format!("run_{}", Uuid::new_v4().simple()));
                    case.agent_run_status = Some("running".into());
                    reindex(&mut self.by_updated, case, wall);
                    self.set_status(from, CaseStatus::Claimed);
                    self.schedule(due.at + finish_after, due.id, Step::Finish);
                }
                (Step::Finish, CaseStatus::Claimed) => {
                    let to = if fail(case) {
                        CaseStatus::Failed
                    } else {
                        CaseStatus::Completed
                    };
                    case.status = to;
                    case.completed_at = Some(wall);
                    case.agent_run_status = Some(to.as_str().into());
                    reindex(&mut self.by_updated, case, wall);
                    self.set_status(from, to);
                }
                // Stale entry (the case moved on by other means): ignore.
                _ => {}
            }
        }
        self.agenda.peek().map(|Reverse(d)| d.at.max(now))
    }

    /// Put failed/canceled cases of `queue` back to pending.
    pub fn retry(
        &mut self,
        queue: Uuid,
        ids: &[Uuid],
        claim_at: Instant,
    ) -> (Vec<Uuid>, Vec<RetrySkip>) {
        let now = now_utc();
        let mut retried = Vec::new();
        let mut skipped = Vec::new();
        for &id in ids {
            let Some(case) = self.cases.get_mut(&id).filter(|c| c.queue_id == queue) else {
                skipped.push(RetrySkip {
                    id,
                    reason: "not_found".into(),
                });
                continue;
            };
            let from = case.status;
            if !matches!(from, CaseStatus::Failed | CaseStatus::Canceled) {
                skipped.push(RetrySkip {
                    id,
                    reason: format!("status is {from}, only failed or canceled cases are retried"),
                });
                continue;
            }
            case.status = CaseStatus::Pending;
            case.claimed_at = None;
            case.claimed_by_run_id = None;
            case.completed_at = None;
            case.agent_run_status = None;
            reindex(&mut self.by_updated, case, now);
            self.set_status(from, CaseStatus::Pending);
            self.schedule(claim_at, id, Step::Claim);
            retried.push(id);
        }
        (retried, skipped)
    }

    pub fn queue_len(&self, queue: Uuid) -> usize {
        self.by_created.get(&queue).map_or(0, BTreeSet::len)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn status_counts(&self) -> BTreeMap<String, u64> {
        self.status_counts
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), *v))
            .collect()
    }

    /// Cases held per queue id (every status).
    pub fn queue_counts(&self) -> BTreeMap<String, u64> {
        self.by_created
            .iter()
            .map(|(q, ids)| (q.to_string(), ids.len() as u64))
            .collect()
    }

    /// Cases `order[from..from+n]`, cloned (for streaming in chunks).
    pub fn chunk(&self, from: usize, n: usize) -> Vec<Case> {
        self.order
            .iter()
            .skip(from)
            .take(n)
            .filter_map(|id| self.cases.get(id).cloned())
            .collect()
    }

    pub fn snapshot(&self) -> Vec<Case> {
        self.chunk(0, self.order.len())
    }

    /// List/search over one queue: filter, sort (ties by id), page. Walks
    /// the index of the sort key from its `*_from` bound (both index and
    /// sort order are (key, id), so ties come out by id as before).
    pub fn list(&self, queue: Uuid, p: &ListParams) -> CaseList {
        use std::ops::Bound;
        let (index, from) = match p.sort_by {
            SortBy::CreatedAt => (self.by_created.get(&queue), p.created_at_from),
            SortBy::UpdatedAt => (self.by_updated.get(&queue), p.updated_at_from),
        };
        let empty = BTreeSet::new();
        let index = index.unwrap_or(&empty);
        let lower = from.map_or(Bound::Unbounded, |t| Bound::Included((t, Uuid::nil())));
        let range = index.range((lower, Bound::Unbounded));
        let ordered: Box<dyn Iterator<Item = &(DateTime<Utc>, Uuid)>> = match p.sort_order {
            SortOrder::Asc => Box::new(range),
            SortOrder::Desc => Box::new(range.rev()),
        };
        let offset = usize::try_from(p.offset).unwrap_or(usize::MAX);
        let mut total = 0usize;
        let mut cases = Vec::new();
        for (_, id) in ordered {
            let Some(c) = self.cases.get(id).filter(|c| matches(c, p)) else {
                continue;
            };
            if total >= offset && cases.len() < p.limit as usize {
                cases.push(c.clone());
            }
            total += 1;
        }
        CaseList {
            cases,
            total: total as u64,
            limit: p.limit,
            offset: p.offset,
        }
    }
}

/// Move `case` to `at` in its queue's updated_at index and set the field.
fn reindex(
    index: &mut HashMap<Uuid, BTreeSet<(DateTime<Utc>, Uuid)>>,
    case: &mut Case,
    at: DateTime<Utc>,
) {
    let set = index.entry(case.queue_id).or_default();
    set.remove(&(case.updated_at, case.id));
    case.updated_at = at;
    set.insert((at, case.id));
}

fn matches(c: &Case, p: &ListParams) -> bool {
    if !p.statuses.is_empty() {
        let hit = p.statuses.iter().any(|s| match s {
            CaseStatus::NeedsInput => c.pending_human_request_id.is_some(),
            CaseStatus::Postponed => c.postponed_to.is_some(),
            s => *s == c.status,
        });
        if !hit {
            return false;
        }
    }
    if let Some(t) = p.created_at_from
        && c.created_at < t
    {
        return false;
    }
    if let Some(t) = p.updated_at_from
        && c.updated_at < t
    {
        return false;
    }
    if let Some(needle) = &p.search {
        let in_title = c.title.to_lowercase().contains(needle.as_str());
        let in_data = c
            .data
            .as_deref()
            .is_some_and(|d| d.to_lowercase().contains(needle.as_str()));
        if !in_title && !in_data {
            return false;
        }
    }
    true
}

/// Deterministic failure decision of the simulated agent: a case fails when
/// its data contains `"simulate":"fail"`, or when a stable FNV-1a hash of
/// title and data maps below `fail_ratio`. Public so tests can predict it.
pub fn would_fail(title: &str, data: Option<&str>, fail_ratio: f64) -> bool {
    let data = data.unwrap_or("");
    if super::validate::simulate_hook(data).as_deref() == Some("fail") {
        return true;
    }
    if fail_ratio <= 0.0 {
        return false;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in title.bytes().chain([0u8]).chain(data.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's high bits mix poorly for inputs that differ only at the end
    // ("job 1", "job 2"); a splitmix64 finaliser spreads them.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h as f64 / u64::MAX as f64) < fail_ratio
}

/// Idempotency records, scoped by (API key, Idempotency-Key).
#[derive(Debug, Default)]
pub(crate) struct IdemStore {
    map: HashMap<(String, String), IdemEntry>,
    /// Insertion order for expiry; entries are checked against `map` so a
    /// re-inserted key is not expired early.
    expiry: VecDeque<(Instant, (String, String))>,
}

#[derive(Debug)]
struct IdemEntry {
    fingerprint: [u8; 32],
    inserted: Instant,
    done: Option<(u16, Bytes)>,
}

/// What to do with a create request carrying an Idempotency-Key.
#[derive(Debug, PartialEq)]
pub(crate) enum Begin {
    /// First time: proceed, then [`IdemStore::complete`] or [`IdemStore::abandon`].
    Fresh,
    /// Same key, same request: answer this again.
    Replay(u16, Bytes),
    /// Same key while the first request is still being processed.
    InProgress,
    /// Same key, different request.
    Mismatch,
}

/// How long an Idempotency-Key is remembered (assumed by the contract).
pub(crate) const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

impl IdemStore {
    pub fn begin(&mut self, scope: (String, String), fingerprint: [u8; 32], now: Instant) -> Begin {
        self.expire(now);
        if let Some(e) = self.map.get(&scope) {
            return match (&e.done, e.fingerprint == fingerprint) {
                (_, false) => Begin::Mismatch,
                (None, true) => Begin::InProgress,
                (Some((status, body)), true) => Begin::Replay(*status, body.clone()),
            };
        }
        self.expiry.push_back((now, scope.clone()));
        self.map.insert(
            scope,
            IdemEntry {
                fingerprint,
                inserted: now,
                done: None,
            },
        );
        Begin::Fresh
    }

    pub fn complete(&mut self, scope: &(String, String), status: u16, body: Bytes) {
        if let Some(e) = self.map.get_mut(scope) {
            e.done = Some((status, body));
        }
    }

    /// The request ended without committing anything: forget the key so a
    /// retry is processed normally.
    pub fn abandon(&mut self, scope: &(String, String)) {
        if self.map.get(scope).is_some_and(|e| e.done.is_none()) {
            self.map.remove(scope);
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((t, _)) = self.expiry.front() {
            if now.saturating_duration_since(*t) < IDEMPOTENCY_TTL {
                break;
            }
            let Some((t, scope)) = self.expiry.pop_front() else {
                break;
            };
            if self.map.get(&scope).is_some_and(|e| e.inserted == t) {
                self.map.remove(&scope);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }
}

/// Monotonic counters behind `/_sim/stats`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub requests: AtomicU64,
    pub create_requests: AtomicU64,
    pub list_requests: AtomicU64,
    pub cases_created: AtomicU64,
    pub rate_limited: AtomicU64,
    pub early_retries: AtomicU64,
    pub idempotent_replays: AtomicU64,
    pub faults_injected: AtomicU64,
    pub dropped_after_commit: AtomicU64,
    pub unauthorized: AtomicU64,
    pub responses: Mutex<BTreeMap<u16, u64>>,
}

impl Counters {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub fn record_response(&self, status: u16) {
        *lock(&self.responses).entry(status).or_insert(0) += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nc(title: &str) -> NewCase {
        NewCase {
            title: title.into(),
            data: None,
            labels: vec![],
            priority: None,
        }
    }

    #[test]
    fn fail_decision_is_deterministic() {
        assert!(would_fail("x", Some(r#"{"simulate":"fail"}"#), 0.0));
        assert!(would_fail(
            "x",
            Some(r#"{ "id": 1, "simulate" : "fail" }"#),
            0.0
        ));
        assert!(!would_fail("x", Some(r#"{"note": "simulate fail"}"#), 0.0));
        assert!(!would_fail("x", Some("ok"), 0.0));
        assert!(would_fail("x", Some("ok"), 1.0));
        let share = (0..10_000)
            .filter(|i| would_fail(&format!("t{i}"), None, 0.3))
            .count();
        assert!((2_500..3_500).contains(&share), "share {share}");
        for i in 0..100 {
            let t = format!("t{i}");
            assert_eq!(would_fail(&t, None, 0.5), would_fail(&t, None, 0.5));
        }
    }

    #[test]
    fn agent_steps_follow_the_agenda() {
        let mut s = Store::new();
        let q = Uuid::new_v4();
        let t0 = Instant::now();
        let half = Duration::from_millis(50);
        let made = s.commit(q, vec![nc("a"), nc("b")], t0 + half);
        let never = |_: &Case| false;
        assert_eq!(s.run_due(t0, half, &never, 100), Some(t0 + half));
        assert_eq!(s.run_due(t0 + half, half, &never, 100), Some(t0 + 2 * half));
        assert_eq!(s.status_counts()["claimed"], 2);
        let fail_b = |c: &Case| c.title == "b";
        assert_eq!(s.run_due(t0 + 2 * half, half, &fail_b, 100), None);
        let snap = s.snapshot();
        assert_eq!(snap[0].id, made[0].id);
        assert_eq!(snap[0].status, CaseStatus::Completed);
        assert_eq!(snap[1].status, CaseStatus::Failed);
        assert!(snap[1].completed_at.is_some() && snap[1].claimed_by_run_id.is_some());
        let (retried, skipped) = s.retry(q, &[made[0].id, made[1].id], t0);
        assert_eq!(retried, vec![made[1].id]);
        assert_eq!(skipped.len(), 1);
        assert_eq!(s.status_counts()["pending"], 1);
    }

    #[test]
    fn budget_bounds_work_per_call() {
        let mut s = Store::new();
        let t0 = Instant::now();
        s.commit(
            Uuid::new_v4(),
            (0..10).map(|i| nc(&i.to_string())).collect(),
            t0,
        );
        let later = t0 + Duration::from_secs(1);
        assert_eq!(
            s.run_due(later, Duration::from_secs(10), &|_| false, 4),
            Some(later)
        );
        assert_eq!(s.status_counts()["claimed"], 4);
    }

    #[test]
    fn idempotency_records_expire_after_ttl() {
        let mut st = IdemStore::default();
        let t0 = Instant::now();
        let scope = ("k".to_string(), "i".to_string());
        assert_eq!(st.begin(scope.clone(), [1; 32], t0), Begin::Fresh);
        assert_eq!(st.begin(scope.clone(), [1; 32], t0), Begin::InProgress);
        st.complete(&scope, 201, Bytes::from_static(b"{}"));
        assert_eq!(
            st.begin(scope.clone(), [1; 32], t0),
            Begin::Replay(201, Bytes::from_static(b"{}"))
        );
        assert_eq!(st.begin(scope.clone(), [2; 32], t0), Begin::Mismatch);
        let later = t0 + IDEMPOTENCY_TTL + Duration::from_secs(1);
        assert_eq!(st.begin(scope.clone(), [2; 32], later), Begin::Fresh);
        assert_eq!(st.len(), 1);
        st.abandon(&scope);
        assert_eq!(st.len(), 0);
    }
}
