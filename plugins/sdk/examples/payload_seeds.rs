//! Writes one encoded example of every plugin payload type into the folder given as the
//! first argument (seeds for the payload decoder fuzz target).

use lookout_plugin_sdk::abi::encode;
use lookout_plugin_sdk::*;

fn main() -> Result<(), String> {
    let dir = std::env::args().nth(1).ok_or("usage: payload_seeds DIR")?;
    let row = Row {
        table: "DeviceFileEvents".into(),
        key: vec![b'e', 0, 2, 0, 1, b'a'],
        ingested_at: 42,
        columns: vec![
            ("SHA1".into(), Cell::Str("a".into())),
            ("FileSize".into(), Cell::Int(7)),
            ("X".into(), Cell::Null),
        ],
    };
    let rr = RowRef { table: "DeviceFileEvents".into(), sha1: "a".into(), device_id: "d".into(), key: vec![1, 2, 3] };
    let spec = InputSpec {
        table: "DeviceImageLoadEvents".into(),
        only_where: vec![
            Condition::In { column: "InitiatingProcessFileName".into(), any_of: vec!["wsmprovhost.exe".into()] },
            Condition::NotStartsWith { column: "FolderPath".into(), prefix: "C:\\Windows".into() },
        ],
        on_backfill: true,
    };
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("eval_request", encode(&EvalRequest { now: 1, backfill: false, rows: vec![rr.clone(), rr], last: true })?),
        (
            "eval_response",
            encode(&EvalResponse {
                findings: vec![FindingOut {
                    inputs: vec![vec![1]],
                    device_id: "d".into(),
                    device_name: "n".into(),
                    row: row.columns.clone(),
                }],
                state: vec![StateOp::Put(vec![1], vec![2]), StateOp::Delete(vec![3])],
                inputs: Some(vec![spec.clone()]),
                wake_at: Some(7),
            })?,
        ),
        (
            "host_request",
            encode(&HostRequest::Lookup { table: "T".into(), sha1: "s".into(), device_id: Some("d".into()) })?,
        ),
        ("host_response", encode(&HostResponse::Rows(vec![row.clone()]))?),
        ("init_response", encode(&InitResponse { inputs: vec![spec] })?),
        (
            "init_request",
            encode(&InitRequest { params: vec![("a".into(), "b".into())], state: vec![(vec![1], vec![2])] })?,
        ),
    ];
    for (name, bytes) in seeds {
        std::fs::write(format!("{dir}/{name}"), bytes).map_err(|e| e.to_string())?;
    }
    Ok(())
}
