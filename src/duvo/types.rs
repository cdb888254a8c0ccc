//! Wire types of the Duvo cases API (see `docs/duvo-cases-api.md`).
//!
//! Both the client and the simulator use these, so a change to the contract is
//! made once and both sides follow. Unknown fields are tolerated on input
//! (the real API adds fields over time); every field the bridge does not need
//! is optional.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Longest title the API accepts, in characters (not bytes).
pub const MAX_TITLE_CHARS: usize = 500;
/// Most cases in one create request.
pub const MAX_CASES_PER_REQUEST: usize = 100;
/// Largest request body the API accepts (assumed: 1 MiB).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Priority of a case. `none` is the API's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    #[default]
    None,
    Medium,
    High,
}

/// A `{key, value}` label; labels missing on the queue are created by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Label {
    pub key: String,
    pub value: String,
}

/// A case as submitted in a create request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewCase {
    pub title: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<Label>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
}

/// Body of `POST /queues/{id}/cases`: exactly one of `case` or `cases`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateCasesRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case: Option<NewCase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cases: Option<Vec<NewCase>>,
}

impl CreateCasesRequest {
    pub fn single(case: NewCase) -> Self {
        Self {
            case: Some(case),
            cases: None,
        }
    }
    pub fn batch(cases: Vec<NewCase>) -> Self {
        Self {
            case: None,
            cases: Some(cases),
        }
    }
}

/// Stored status of a case, plus the two derived filters the list endpoint
/// accepts (`needs_input`, `postponed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaseStatus {
    Pending,
    Claimed,
    Completed,
    Failed,
    Canceled,
    NeedsInput,
    Postponed,
}

impl CaseStatus {
    pub const ALL: [CaseStatus; 7] = [
        CaseStatus::Pending,
        CaseStatus::Claimed,
        CaseStatus::Completed,
        CaseStatus::Failed,
        CaseStatus::Canceled,
        CaseStatus::NeedsInput,
        CaseStatus::Postponed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CaseStatus::Pending => "pending",
            CaseStatus::Claimed => "claimed",
            CaseStatus::Completed => "completed",
            CaseStatus::Failed => "failed",
            CaseStatus::Canceled => "canceled",
            CaseStatus::NeedsInput => "needs_input",
            CaseStatus::Postponed => "postponed",
        }
    }

    /// `completed`, `failed` and `canceled` end a case (a failed case may
    /// still be retried back to pending by a human).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            CaseStatus::Completed | CaseStatus::Failed | CaseStatus::Canceled
        )
    }
}

impl std::fmt::Display for CaseStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for CaseStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CaseStatus::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown case status {s:?}"))
    }
}

/// A case as the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Case {
    pub id: Uuid,
    pub queue_id: Uuid,
    pub title: String,
    #[serde(default)]
    pub data: Option<String>,
    pub status: CaseStatus,
    #[serde(default)]
    pub labels: Vec<Label>,
    #[serde(default)]
    pub priority: Option<Priority>,
    #[serde(default)]
    pub claimed_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub claimed_by_run_id: Option<String>,
    #[serde(default)]
    pub completed_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub postponed_to: Option<DateTime<Utc>>,
    #[serde(default)]
    pub pending_human_request_id: Option<String>,
    #[serde(default)]
    pub agent_run_status: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Answer to a successful create: the cases in request order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateCasesResponse {
    pub added_cases: Vec<Case>,
}

/// Sort order for list and search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SortOrder {
    Asc,
    #[default]
    Desc,
}

impl SortOrder {
    pub fn as_str(self) -> &'static str {
        match self {
            SortOrder::Asc => "asc",
            SortOrder::Desc => "desc",
        }
    }
}

/// Field to sort a listing by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SortBy {
    #[default]
    CreatedAt,
    UpdatedAt,
}

impl SortBy {
    pub fn as_str(self) -> &'static str {
        match self {
            SortBy::CreatedAt => "created_at",
            SortBy::UpdatedAt => "updated_at",
        }
    }
}

/// Query of `GET /queues/{id}/cases`. `None` fields are not sent, so the
/// server's defaults apply (limit 20, sort created_at desc).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListQuery {
    pub limit: Option<u32>,
    pub offset: Option<u64>,
    pub status: Vec<CaseStatus>,
    pub search: Option<String>,
    pub created_at_from: Option<DateTime<Utc>>,
    pub updated_at_from: Option<DateTime<Utc>>,
    pub sort_by: Option<SortBy>,
    pub sort_order: Option<SortOrder>,
}

/// Filters of the search body (`POST /queues/{id}/cases/search`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SearchFilters {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub status: Vec<CaseStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at_from: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at_from: Option<DateTime<Utc>>,
}

/// Body of `POST /queues/{id}/cases/search`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SearchRequest {
    #[serde(default)]
    pub filters: SearchFilters,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sort_by: Option<SortBy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sort_order: Option<SortOrder>,
}

/// A page of cases from list or search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseList {
    pub cases: Vec<Case>,
    pub total: u64,
    pub limit: u32,
    pub offset: u64,
}

/// Body of `POST /queues/{id}/cases/bulk-retry` (1 to 100 ids).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkRetryRequest {
    pub case_ids: Vec<Uuid>,
}

/// Answer of bulk-retry: the cases sent back to `pending`, and those
/// skipped (unknown or not failed). The contract's shape is assumed; a
/// skipped entry is kept as the server wrote it (an id, or an object).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BulkRetryResponse {
    #[serde(default)]
    pub retried: Vec<Uuid>,
    #[serde(default)]
    pub skipped: Vec<serde_json::Value>,
}

/// The API's error body. Only `error` and `message` are documented as always
/// present in older docs; newer docs add the rest. Parse all, require none.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}
