//! A test collector for the daemon and crash-loop tests: it writes a generated fleet's
//! tables into a logs folder in random chunks (split anywhere, mid-line included) and
//! rotates the files the ways collectors and logrotate do — rename, copytruncate, gzip of
//! the rotated file — deleting an old rotation only once a running daemon has read
//! everything (deleting unread data cannot be recovered by anyone).

use crate::daemon::Daemon;
use crate::Rng;
use flate2::write::GzEncoder;
use flate2::Compression;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One table's data, written to `<table>.jsonl` up to `pos`.
pub struct Stream {
    pub table: &'static str,
    pub data: Vec<u8>,
    pub pos: usize,
}

impl Stream {
    /// `table`'s generated file in `fleet_logs`, nothing written yet.
    pub fn from_fleet(fleet_logs: &Path, table: &'static str) -> Stream {
        let path = fleet_logs.join(format!("{table}.jsonl"));
        let data = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Stream { table, data, pos: 0 }
    }
}

/// What the collector did, to check that a run exercised what it claims.
#[derive(Default, Debug)]
pub struct Tally {
    pub chunks: u32,
    pub partial_line_chunks: u32,
    pub renames: u32,
    pub copytruncates: u32,
    pub gzips: u32,
    pub deletions: u32,
    /// Rotations not done because the old `.1.gz` could not be deleted yet.
    pub skipped_rotations: u32,
    pub catch_up_waits: u32,
}

pub enum Rotation {
    Rename,
    CopyTruncate,
}

pub struct Collector {
    pub logs: PathBuf,
    pub streams: Vec<Stream>,
    pub rng: Rng,
    pub tally: Tally,
    /// Out of 100 steps, about how many rename, copytruncate, gzip and delete.
    pub mix: [u64; 4],
    /// A running daemon that did not catch up in time before a deletion (a stall): the
    /// test reports it as a failure.
    pub stalls: Vec<String>,
}

impl Collector {
    pub fn new(logs: &Path, streams: Vec<Stream>, seed: u64, mix: [u64; 4]) -> Collector {
        Collector {
            logs: logs.to_path_buf(),
            streams,
            rng: Rng::new(seed),
            tally: Tally::default(),
            mix,
            stalls: Vec::new(),
        }
    }

    pub fn path(&self, i: usize, suffix: &str) -> PathBuf {
        self.logs.join(format!("{}.jsonl{suffix}", self.streams[i].table))
    }

    /// Bytes written so far, all streams.
    pub fn written(&self) -> usize {
        self.streams.iter().map(|s| s.pos).sum()
    }

    pub fn total(&self) -> usize {
        self.streams.iter().map(|s| s.data.len()).sum()
    }

    pub fn done(&self) -> bool {
        self.written() == self.total()
    }

    /// Appends the next `n` bytes of stream `i` (wherever they end) to its live file;
    /// returns how many there were.
    pub fn append(&mut self, i: usize, n: usize) -> usize {
        let path = self.path(i, "");
        let s = &mut self.streams[i];
        let end = (s.pos + n).min(s.data.len());
        let mut f = OpenOptions::new().create(true).append(true).open(&path).expect("open the live file");
        f.write_all(&s.data[s.pos..end]).expect("append to the live file");
        let n = end - s.pos;
        s.pos = end;
        n
    }

    pub fn mid_line(&self, i: usize) -> bool {
        let s = &self.streams[i];
        s.pos > 0 && s.data[s.pos - 1] != b'\n'
    }

    /// Completes the line in hand: a collector rotates only between lines.
    pub fn finish_line(&mut self, i: usize) -> usize {
        if !self.mid_line(i) {
            return 0;
        }
        let s = &self.streams[i];
        let nl = s.data[s.pos..].iter().position(|b| *b == b'\n').expect("the data ends with a newline");
        self.append(i, nl + 1)
    }

    pub fn finish_lines(&mut self) -> usize {
        (0..self.streams.len()).map(|i| self.finish_line(i)).sum()
    }

    /// Writes a random chunk (1 byte to `max`, split anywhere) of stream `i`.
    pub fn chunk(&mut self, i: usize, max: usize) -> usize {
        let n = 1 + self.rng.below(max as u64) as usize;
        let n = self.append(i, n);
        self.tally.chunks += 1;
        if self.mid_line(i) {
            self.tally.partial_line_chunks += 1;
        }
        n
    }

    /// Rotates stream `i`'s live file; an existing `.1` is gzipped first (which may need
    /// the old `.1.gz` deleted, which needs a running daemon that has read it). Returns
    /// the bytes written to finish the line in hand.
    pub fn rotate(&mut self, i: usize, how: Rotation, daemon: Option<&mut Daemon>) -> usize {
        let live = self.path(i, "");
        if fs::metadata(&live).map(|m| m.len()).unwrap_or(0) == 0 {
            return 0; // notifempty
        }
        let n = self.finish_line(i);
        let one = self.path(i, ".1");
        if one.exists() && !self.gzip_rotated(i, daemon) {
            self.tally.skipped_rotations += 1;
            return n;
        }
        match how {
            Rotation::Rename => {
                fs::rename(&live, &one).expect("rename the live file");
                File::create(&live).expect("create the live file");
                self.tally.renames += 1;
            }
            Rotation::CopyTruncate => {
                fs::copy(&live, &one).expect("copy the live file");
                OpenOptions::new().write(true).open(&live).and_then(|f| f.set_len(0)).expect("truncate");
                self.tally.copytruncates += 1;
            }
        }
        n
    }

    /// `.1` → `.1.gz` (written under a temporary name, then renamed), then `.1` deleted.
    pub fn gzip_rotated(&mut self, i: usize, daemon: Option<&mut Daemon>) -> bool {
        let one = self.path(i, ".1");
        if !one.exists() {
            return false;
        }
        let gz = self.path(i, ".1.gz");
        if gz.exists() && !self.delete_old(i, daemon) {
            return false;
        }
        let tmp = self.path(i, ".1.gz.tmp");
        let mut enc = GzEncoder::new(File::create(&tmp).expect("create the gzip"), Compression::fast());
        std::io::copy(&mut File::open(&one).expect("open .1"), &mut enc).expect("gzip .1");
        enc.finish().and_then(|f| f.sync_all()).expect("finish the gzip");
        fs::rename(&tmp, &gz).expect("rename the gzip into place");
        fs::remove_file(&one).expect("delete .1");
        self.tally.gzips += 1;
        true
    }

    /// Deletes the old `.1.gz` once the running `daemon` has read everything (with no
    /// daemon, or one that does not catch up, nothing is deleted).
    pub fn delete_old(&mut self, i: usize, daemon: Option<&mut Daemon>) -> bool {
        let gz = self.path(i, ".1.gz");
        if !gz.exists() {
            return false;
        }
        let Some(d) = daemon else { return false };
        self.finish_lines();
        self.tally.catch_up_waits += 1;
        if let Err(e) = d.wait_caught_up(&self.logs, Duration::from_secs(90)) {
            if d.exit_status().is_none() {
                self.stalls.push(format!("a running daemon did not catch up with the logs folder: {e}"));
            }
            return false;
        }
        fs::remove_file(&gz).expect("delete .1.gz");
        self.tally.deletions += 1;
        true
    }

    /// A chunk of a random stream with data left and now and then a rotation, a gzip or
    /// a deletion (the latter only with `daemon`). Returns the bytes written.
    pub fn step(&mut self, max_chunk: usize, daemon: Option<&mut Daemon>) -> usize {
        let open: Vec<usize> =
            (0..self.streams.len()).filter(|i| self.streams[*i].pos < self.streams[*i].data.len()).collect();
        if open.is_empty() {
            return 0;
        }
        let i = open[self.rng.below(open.len() as u64) as usize];
        let mut n = self.chunk(i, max_chunk);
        // Rotation is blocked until the old `.1.gz` goes: delete it more often then.
        let blocked = self.path(i, ".1").exists() && self.path(i, ".1.gz").exists();
        if blocked && daemon.is_some() && self.rng.below(4) == 0 {
            self.delete_old(i, daemon);
            return n;
        }
        let [rename, copytruncate, gzip, delete] = self.mix;
        let roll = self.rng.below(100);
        if roll < rename {
            n += self.rotate(i, Rotation::Rename, daemon);
        } else if roll < rename + copytruncate {
            n += self.rotate(i, Rotation::CopyTruncate, daemon);
        } else if roll < rename + copytruncate + gzip {
            if !self.path(i, ".1.gz").exists() {
                self.gzip_rotated(i, daemon);
            }
        } else if roll < rename + copytruncate + gzip + delete {
            self.delete_old(i, daemon);
        }
        n
    }
}
