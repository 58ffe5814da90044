//! Batches ClickHouse could not take, kept on disk until it can: one file per batch, named by
//! a sequence number so that they are delivered in the order they were made, written to a
//! temporary name and renamed so that a crash never leaves half a batch. The spool is bounded
//! in bytes; a batch that does not fit is refused (and its rows counted as dropped by the
//! caller). What a spool holds when the process stops is delivered by the next one.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};

use super::rows::DecisionRow;

/// Where batches wait, and how much room they may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolSettings {
    /// The directory (created when missing). One exporter per directory.
    pub dir: PathBuf,
    /// The most bytes the spooled batches may take together.
    pub max_bytes: u64,
}

/// One spooled batch: its file and size.
#[derive(Debug)]
struct Entry {
    path: PathBuf,
    bytes: u64,
    rows: u64,
}

/// The spool's files, oldest first.
#[derive(Debug)]
pub struct Spool {
    settings: SpoolSettings,
    entries: VecDeque<Entry>,
    bytes: u64,
    next_seq: u64,
}

/// A spooled file's extension; half-written files have [`PARTIAL`] instead.
const EXTENSION: &str = "jsonl";
const PARTIAL: &str = "partial";

impl Spool {
    /// Opens the spool in `settings.dir`: what earlier processes left is delivered first;
    /// half-written files (a crash while spooling) are removed.
    pub fn open(settings: SpoolSettings) -> io::Result<Spool> {
        std::fs::create_dir_all(&settings.dir)?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&settings.dir)? {
            let path = entry?.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some(PARTIAL) => std::fs::remove_file(&path)?,
                Some(EXTENSION) => {
                    let Some(seq) = sequence(&path) else { continue };
                    let bytes = std::fs::metadata(&path)?.len();
                    let rows = count_lines(&path)?;
                    found.push((seq, Entry { path, bytes, rows }));
                }
                _ => {}
            }
        }
        found.sort_by_key(|(seq, _)| *seq);
        let next_seq = found.last().map_or(0, |(seq, _)| seq + 1);
        let bytes = found.iter().map(|(_, e)| e.bytes).sum();
        Ok(Spool {
            settings,
            entries: found.into_iter().map(|(_, e)| e).collect(),
            bytes,
            next_seq,
        })
    }

    /// Writes `batch` after the others; `Ok(false)` when it does not fit.
    pub async fn push(&mut self, batch: &[DecisionRow]) -> io::Result<bool> {
        let mut text = Vec::new();
        for row in batch {
            serde_json::to_writer(&mut text, row).map_err(io::Error::other)?;
            text.push(b'\n');
        }
        let bytes = text.len() as u64;
        if self.bytes + bytes > self.settings.max_bytes {
            return Ok(false);
        }
        let path = self
            .settings
            .dir
            .join(format!("{:020}.{EXTENSION}", self.next_seq));
        let partial = path.with_extension(PARTIAL);
        tokio::fs::write(&partial, &text).await?;
        tokio::fs::rename(&partial, &path).await?;
        self.next_seq += 1;
        self.bytes += bytes;
        self.entries.push_back(Entry {
            path,
            bytes,
            rows: batch.len() as u64,
        });
        Ok(true)
    }

    /// The oldest batch, read back (`None`: the spool is empty). A file that cannot be
    /// parsed is moved aside (`.corrupt`, kept for an operator) and its rows reported.
    pub async fn front(&mut self) -> Option<Result<Vec<DecisionRow>, Corrupt>> {
        let entry = self.entries.front()?;
        let parsed = match tokio::fs::read(&entry.path).await {
            Ok(text) => text
                .split(|b| *b == b'\n')
                .filter(|line| !line.is_empty())
                .map(serde_json::from_slice::<DecisionRow>)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match parsed {
            Ok(rows) => Some(Ok(rows)),
            Err(error) => {
                let rows = entry.rows;
                let aside = entry.path.with_extension("corrupt");
                let _ = tokio::fs::rename(&entry.path, &aside).await;
                self.forget_front();
                Some(Err(Corrupt {
                    path: aside,
                    rows,
                    error,
                }))
            }
        }
    }

    /// Removes the oldest batch (delivered).
    pub async fn pop_front(&mut self) -> io::Result<()> {
        if let Some(entry) = self.entries.front() {
            tokio::fs::remove_file(&entry.path).await?;
            self.forget_front();
        }
        Ok(())
    }

    fn forget_front(&mut self) {
        if let Some(entry) = self.entries.pop_front() {
            self.bytes -= entry.bytes;
        }
    }

    /// Whether no batch waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The rows waiting.
    pub fn rows(&self) -> u64 {
        self.entries.iter().map(|e| e.rows).sum()
    }

    /// The bytes they take.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// A spooled batch that could not be read back.
#[derive(Debug)]
pub struct Corrupt {
    /// Where it was moved.
    pub path: PathBuf,
    /// Its rows (lost to ClickHouse).
    pub rows: u64,
    /// Why it could not be read.
    pub error: String,
}

fn sequence(path: &Path) -> Option<u64> {
    path.file_stem()?.to_str()?.parse().ok()
}

fn count_lines(path: &Path) -> io::Result<u64> {
    let text = std::fs::read(path)?;
    Ok(text.iter().filter(|b| **b == b'\n').count() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> DecisionRow {
        DecisionRow {
            request_id: id.into(),
            ..DecisionRow::default()
        }
    }

    #[tokio::test]
    async fn batches_come_back_in_order_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let settings = SpoolSettings {
            dir: dir.path().join("spool"),
            max_bytes: 1 << 20,
        };
        let mut spool = Spool::open(settings.clone()).unwrap();
        for n in 0..12 {
            assert!(
                spool
                    .push(&[row(&format!("r{n}")), row("x")])
                    .await
                    .unwrap()
            );
        }
        assert_eq!(spool.rows(), 24);
        // A crash while writing leaves a partial file: not delivered, removed.
        std::fs::write(settings.dir.join("00000000000000000099.partial"), b"{").unwrap();
        drop(spool);
        let mut spool = Spool::open(settings.clone()).unwrap();
        assert_eq!(spool.rows(), 24);
        for n in 0..12 {
            let batch = spool.front().await.unwrap().unwrap();
            assert_eq!(&*batch[0].request_id, format!("r{n}"));
            spool.pop_front().await.unwrap();
        }
        assert!(spool.is_empty());
        assert_eq!(spool.bytes(), 0);
        assert_eq!(std::fs::read_dir(&settings.dir).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_full_spool_refuses_and_a_corrupt_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let settings = SpoolSettings {
            dir: dir.path().to_owned(),
            max_bytes: 2_000,
        };
        let mut spool = Spool::open(settings.clone()).unwrap();
        let batch: Vec<_> = (0..3).map(|n| row(&n.to_string())).collect();
        let mut accepted = 0;
        while spool.push(&batch).await.unwrap() {
            accepted += 1;
        }
        assert!(accepted >= 1);
        assert!(spool.bytes() <= 2_000);
        std::fs::write(&spool.entries[0].path, b"not json\n").unwrap();
        let Some(Err(corrupt)) = spool.front().await else {
            panic!("a corrupt file is reported")
        };
        assert_eq!(corrupt.rows, 3);
        assert!(corrupt.path.exists());
        assert_eq!(spool.rows(), 3 * (accepted - 1));
    }
}
