//! 64-bit hashes, one per row, checked for repeats in bounded memory: up to
//! a run's worth sorted in memory, the rest spilled as sorted runs to
//! temporary files and merged at the end (an external sort that keeps only
//! the repeated values). The restore preflight's unique-key check uses it, so
//! its memory does not grow with the largest table.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::PathBuf;

/// Hashes kept in memory before a run is spilled: 16 MiB.
pub const RUN_HASHES: usize = 2 * 1024 * 1024;

/// The hashes of one table's rows, for [`HashRuns::repeated`].
#[derive(Debug)]
pub struct HashRuns {
    run_cap: usize,
    buf: Vec<u64>,
    /// Spilled runs, each sorted; removed on drop.
    runs: Vec<PathBuf>,
    /// The first failure to spill (a full disk), reported by [`Self::repeated`].
    failed: Option<io::Error>,
}

impl HashRuns {
    /// For about `expected` hashes (memory is reserved up to one run).
    #[must_use]
    pub fn new(expected: u64) -> Self {
        Self::with_run_cap(expected, RUN_HASHES)
    }

    fn with_run_cap(expected: u64, run_cap: usize) -> Self {
        let reserve = usize::try_from(expected).unwrap_or(run_cap).min(run_cap);
        Self {
            run_cap,
            buf: Vec::with_capacity(reserve),
            runs: Vec::new(),
            failed: None,
        }
    }

    pub fn push(&mut self, hash: u64) {
        if self.failed.is_some() {
            return;
        }
        self.buf.push(hash);
        if self.buf.len() >= self.run_cap
            && let Err(e) = self.spill()
        {
            self.failed = Some(e);
            self.buf = Vec::new();
        }
    }

    /// Bytes held in memory now.
    #[cfg(test)]
    pub fn memory_bytes(&self) -> usize {
        self.buf.capacity() * std::mem::size_of::<u64>()
    }

    /// The hashes pushed more than once. Frees everything.
    ///
    /// # Errors
    /// A run that could not be written or read back (the temporary directory).
    pub fn repeated(mut self) -> io::Result<HashSet<u64>> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let mut found = HashSet::new();
        if self.runs.is_empty() {
            let mut hashes = std::mem::take(&mut self.buf);
            hashes.sort_unstable();
            for pair in hashes.windows(2) {
                if pair[0] == pair[1] {
                    found.insert(pair[0]);
                }
            }
            return Ok(found);
        }
        if !self.buf.is_empty() {
            self.spill()?;
        }
        self.buf = Vec::new();
        let mut readers = self
            .runs
            .iter()
            .map(|p| File::open(p).map(|f| BufReader::with_capacity(64 * 1024, f)))
            .collect::<io::Result<Vec<_>>>()?;
        let mut heads = BinaryHeap::new();
        for (i, r) in readers.iter_mut().enumerate() {
            if let Some(h) = next_hash(r)? {
                heads.push(Reverse((h, i)));
            }
        }
        let mut last = None;
        while let Some(Reverse((h, i))) = heads.pop() {
            if last == Some(h) {
                found.insert(h);
            }
            last = Some(h);
            if let Some(next) = next_hash(&mut readers[i])? {
                heads.push(Reverse((next, i)));
            }
        }
        Ok(found)
    }

    fn spill(&mut self) -> io::Result<()> {
        self.buf.sort_unstable();
        let path = std::env::temp_dir().join(format!(
            "spirekeep-unique-keys-{}-{:016x}.run",
            std::process::id(),
            rand::random::<u64>()
        ));
        // Recorded first, so a half-written run is removed too.
        self.runs.push(path.clone());
        let mut out = BufWriter::with_capacity(64 * 1024, File::create_new(&path)?);
        for h in &self.buf {
            out.write_all(&h.to_le_bytes())?;
        }
        out.flush()?;
        self.buf.clear();
        Ok(())
    }
}

impl Drop for HashRuns {
    fn drop(&mut self) {
        for p in &self.runs {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn next_hash(r: &mut impl Read) -> io::Result<Option<u64>> {
    let mut b = [0u8; 8];
    match r.read_exact(&mut b) {
        Ok(()) => Ok(Some(u64::from_le_bytes(b))),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mix(i: u64) -> u64 {
        i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17)
    }

    #[test]
    fn repeats_are_found_in_memory_and_across_spilled_runs() {
        for cap in [1_000_000, 1000, 7] {
            let mut runs = HashRuns::with_run_cap(10_000, cap);
            for i in 0..10_000u64 {
                runs.push(mix(i));
            }
            // Repeats far apart (different runs) and side by side.
            runs.push(mix(3));
            runs.push(mix(9_999));
            runs.push(mix(9_999));
            if cap < 10_000 {
                assert_eq!(runs.memory_bytes(), cap * 8, "one run in memory at most");
            }
            let spilled: Vec<PathBuf> = runs.runs.clone();
            assert_eq!(spilled.is_empty(), cap >= 10_003, "cap {cap}");
            let found = runs.repeated().unwrap();
            assert_eq!(found, HashSet::from([mix(3), mix(9_999)]), "run cap {cap}");
            assert!(spilled.iter().all(|p| !p.exists()), "runs removed");
        }
    }

    #[test]
    fn distinct_hashes_repeat_nothing() {
        let mut runs = HashRuns::with_run_cap(0, 64);
        for i in 0..1000u64 {
            runs.push(mix(i));
        }
        assert!(runs.repeated().unwrap().is_empty());
    }
}
