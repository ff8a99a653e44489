//! The Lookout plugin SDK.
//!
//! A detector is a Rust type implementing [`Detector`]; [`export_detector!`] turns it into
//! a shared library that Lookout loads from its plugins folder. Everything that crosses the
//! library boundary is plain bytes: a version byte followed by a bincode 2 payload (see
//! [`abi`]). Each side frees what it allocated, and every export catches panics and turns
//! them into an error code with a message, so a misbehaving detector cannot take the host
//! down.
//!
//! The same crate is used by the host (`lookout-core`) for the payload types, so the two
//! sides can never disagree on a field.

pub mod abi;
pub mod cell;
pub mod collections;
pub mod condition;
pub mod context;
pub mod detector;
#[doc(hidden)]
pub mod export;
pub mod params;
pub mod schema;
pub mod time;
pub mod window;
pub mod wire;

pub use abi::{
    Cmp, Condition, EvalRequest, EvalResponse, FindingOut, HostRequest, HostResponse, IndexDecl, InitRequest,
    InitResponse, InputSpec, Manifest, Parameter, RowRef, StateOp, ABI_VERSION, ABI_VERSION_MAJOR, ABI_VERSION_MINOR,
    INGESTION_TIME, PAYLOAD_VERSION,
};
pub use cell::{Cell, Cells, Row, RowView};
pub use condition::{all_match, CellRef};
pub use context::Context;
pub use detector::Detector;
pub use params::Params;
pub use window::{identity_key, Records};
pub use wire::RowSet;

/// The well-known table names the SDK and host agree on.
pub mod tables {
    pub const IMAGE_LOADS: &str = "DeviceImageLoadEvents";
    pub const FILE_EVENTS: &str = "DeviceFileEvents";
    pub const FILE_PROFILE: &str = "FileProfile";
    pub const PROCESS_EVENTS: &str = "DeviceProcessEvents";
    pub const NETWORK_EVENTS: &str = "DeviceNetworkEvents";
    pub const LOGON_EVENTS: &str = "DeviceLogonEvents";
    pub const REGISTRY_EVENTS: &str = "DeviceRegistryEvents";
    pub const FILE_CERTIFICATES: &str = "DeviceFileCertificateInfo";
    pub const IDENTITY_LOGONS: &str = "IdentityLogonEvents";
}
