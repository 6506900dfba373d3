//! The user-file writer (with the commit log on): one thread per shard writes the lines that
//! waited behind the log (see [`super::behind`]) to the users' queue and index files. The shard
//! thread, which every commit waits for, only hands them over: creating a new user's folder and
//! files, or a write that waits for the file system's journal while the disk is busy (seconds, at
//! times, on a slow disk), no longer holds up the commits behind it.
//!
//! The shard keeps the bookkeeping: where each file's next line goes while lines are on their
//! way ([`Writer::end`]), which log generations still have lines unwritten (a checkpoint waits
//! for them), and the lines of a failed write, which go back to wait (the log keeps them). A read
//! of a user's files first waits for that user's lines ([`Writer::wait`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::hash::Hash;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use lru::LruCache;

use super::behind::{Behind, Waiting};
use super::recovery::io_err;
use super::shard::{copy_err, write_checked};
use super::wal::Written;
use crate::StoreError;

/// What the shard asks the thread to do.
enum Task<K> {
    /// Append `w` to the file at `path` (created, with its folder, if missing).
    Write { key: K, path: PathBuf, w: Waiting },
    /// Close these files' handles: they are about to be replaced (compaction).
    Close(Vec<K>),
}

/// What the thread reports back, in the order of the writes.
enum Outcome<K> {
    Written {
        key: K,
        generation: u64,
        /// The file's length after the write.
        len: u64,
    },
    /// Not written (the file is as before): the lines wait again.
    Failed {
        key: K,
        w: Waiting,
        error: StoreError,
    },
}

/// Lines of one file handed to the thread and not reported back yet.
struct InFlight {
    /// Where the file's next line goes once they are written.
    end: u64,
    writes: usize,
    /// Writes that failed, in order; they wait again once the file's last write is back.
    failed: Vec<Waiting>,
}

/// The shard's side of the writer thread.
pub(crate) struct Writer<K> {
    tx: Option<Sender<Task<K>>>,
    rx: Receiver<Outcome<K>>,
    thread: Option<JoinHandle<()>>,
    in_flight: HashMap<K, InFlight>,
    /// How many handed-over writes begin in each log generation (a checkpoint waits for them).
    generations: BTreeMap<u64, usize>,
    /// The last failure of each file whose lines wait again (a read of it reports it).
    errors: HashMap<K, StoreError>,
}

impl<K: Hash + Eq + Clone + Send + 'static> Writer<K> {
    /// Starts the thread, which keeps at most `open_files` handles open.
    /// `written`: where each file written is noted for the checkpoint (see [`super::wal`]).
    pub fn start(shard: usize, open_files: usize, written: Option<Written>) -> Writer<K> {
        let (tx, tasks) = channel();
        let (done, rx) = channel();
        let cap = NonZeroUsize::new(open_files.max(1)).unwrap_or(NonZeroUsize::MIN);
        let thread = std::thread::Builder::new()
            .name(format!("bimip-store-writer-{shard}"))
            .spawn(move || run(tasks, done, cap, written))
            .map_err(|e| tracing::error!(error = %e, "could not start a user-file writer thread"))
            .ok();
        Writer {
            tx: thread.as_ref().map(|_| tx),
            rx,
            thread,
            in_flight: HashMap::new(),
            generations: BTreeMap::new(),
            errors: HashMap::new(),
        }
    }

    /// Hands `w` over to be appended to `path`; gives it back when there is no thread.
    pub fn send(&mut self, key: K, path: PathBuf, w: Waiting) -> Result<(), (K, Waiting)> {
        let Some(tx) = &self.tx else {
            return Err((key, w));
        };
        let (end, generation) = (w.end(), w.generation);
        if let Err(e) = tx.send(Task::Write {
            key: key.clone(),
            path,
            w,
        }) {
            return match e.0 {
                Task::Write { key, w, .. } => Err((key, w)),
                Task::Close(_) => Ok(()),
            };
        }
        let f = self.in_flight.entry(key).or_insert(InFlight {
            end,
            writes: 0,
            failed: Vec::new(),
        });
        f.end = end;
        f.writes += 1;
        *self.generations.entry(generation).or_default() += 1;
        Ok(())
    }

    /// Whether the thread runs (lines handed over without one come back at once).
    pub fn running(&self) -> bool {
        self.tx.is_some()
    }

    /// Where the next line of `key` goes while lines of it are on their way.
    pub fn end(&self, key: &K) -> Option<u64> {
        self.in_flight.get(key).map(|f| f.end)
    }

    /// The oldest log generation with handed-over lines not yet written.
    pub fn oldest_generation(&self) -> Option<u64> {
        self.generations.keys().next().copied()
    }

    /// Takes what the thread reported since the last call. `written` learns each file's new
    /// length.
    pub fn collect(&mut self, behind: &mut Behind<K>, written: &mut impl FnMut(&K, u64)) {
        while let Ok(o) = self.rx.try_recv() {
            self.settle(o, behind, written);
        }
    }

    /// Blocks until none of `keys` (every file, for `None`) has lines on their way, then
    /// reports the failure of one of them whose lines wait again.
    pub fn wait(
        &mut self,
        keys: Option<&[K]>,
        behind: &mut Behind<K>,
        written: &mut impl FnMut(&K, u64),
    ) -> Result<(), StoreError> {
        let busy = |w: &Self| match keys {
            Some(keys) => keys.iter().any(|k| w.in_flight.contains_key(k)),
            None => !w.in_flight.is_empty(),
        };
        while busy(self) {
            match self.rx.recv() {
                Ok(o) => self.settle(o, behind, written),
                // The thread is gone (it only stops when told to): nothing more will come back.
                Err(_) => break,
            }
        }
        let Some(keys) = keys else { return Ok(()) };
        match keys.iter().find_map(|k| self.errors.get(k)) {
            Some(e) => Err(copy_err(e)),
            None => Ok(()),
        }
    }

    fn settle(&mut self, o: Outcome<K>, behind: &mut Behind<K>, written: &mut impl FnMut(&K, u64)) {
        let (key, generation) = match o {
            Outcome::Written {
                key,
                generation,
                len,
            } => {
                self.errors.remove(&key);
                written(&key, len);
                (key, generation)
            }
            Outcome::Failed { key, w, error } => {
                let generation = w.generation;
                if let Some(f) = self.in_flight.get_mut(&key) {
                    f.failed.push(w);
                }
                self.errors.insert(key.clone(), error);
                (key, generation)
            }
        };
        if let Some(n) = self.generations.get_mut(&generation) {
            *n -= 1;
            if *n == 0 {
                self.generations.remove(&generation);
            }
        }
        let Some(f) = self.in_flight.get_mut(&key) else {
            return;
        };
        f.writes -= 1;
        if f.writes > 0 {
            return;
        }
        let Some(f) = self.in_flight.remove(&key) else {
            return;
        };
        // The failed writes, in order, and what waited behind them since form one run of bytes
        // from the file's current end: they wait again together.
        let mut again: Option<Waiting> = None;
        for w in f.failed.into_iter().chain(behind.take(&key)) {
            match &mut again {
                None => again = Some(w),
                Some(a) => a.append(w),
            }
        }
        if let Some(w) = again {
            behind.put_back(key, w);
        }
    }

    /// Closes the handles of `keys` (their files are about to be replaced).
    pub fn close_files(&mut self, keys: Vec<K>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Task::Close(keys));
        }
    }

    /// Lets the thread finish what it was handed, then stops it.
    pub fn finish(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A handle the thread keeps, and the file's length as the thread left it.
struct Open {
    file: File,
    len: u64,
}

fn run<K: Hash + Eq + Clone>(
    tasks: Receiver<Task<K>>,
    done: Sender<Outcome<K>>,
    cap: NonZeroUsize,
    written: Option<Written>,
) {
    let mut files: LruCache<K, Open> = LruCache::new(cap);
    // Files whose last write failed and was cut back: later writes handed over before the shard
    // learnt of it do not start where the file ends, and come back unwritten.
    let mut cut: HashSet<K> = HashSet::new();
    for task in tasks {
        let (key, path, w) = match task {
            Task::Write { key, path, w } => (key, path, w),
            Task::Close(keys) => {
                for k in &keys {
                    files.pop(k);
                    cut.remove(k);
                }
                continue;
            }
        };
        let out = match write(&mut files, &mut cut, &key, &path, &w) {
            Ok(len) => {
                if let Some(written) = &written {
                    written
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(path);
                }
                Outcome::Written {
                    key,
                    generation: w.generation,
                    len,
                }
            }
            Err(error) => Outcome::Failed { key, w, error },
        };
        if done.send(out).is_err() {
            return;
        }
    }
}

fn write<K: Hash + Eq + Clone>(
    files: &mut LruCache<K, Open>,
    cut: &mut HashSet<K>,
    key: &K,
    path: &std::path::Path,
    w: &Waiting,
) -> Result<u64, StoreError> {
    let mut f = match files.pop(key) {
        Some(f) => f,
        None => match open(files, path) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %e, "could not open a user file to write logged lines to; retried");
                // Later writes must not land where these lines belong.
                cut.insert(key.clone());
                return Err(e);
            }
        },
    };
    if f.len != w.base {
        if cut.contains(key) {
            files.put(key.clone(), f);
            return Err(StoreError::Invalid(format!(
                "{}: an earlier write to this file failed; its lines are retried first",
                path.display()
            )));
        }
        tracing::error!(file = %path.display(), len = f.len, expected = w.base, "a user file's length is not where its logged lines go");
    }
    cut.remove(key);
    match write_checked(&mut f.file, path, &w.bytes) {
        Ok(()) => {
            f.len += w.bytes.len() as u64;
            let len = f.len;
            files.put(key.clone(), f);
            Ok(len)
        }
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "could not write logged lines to a user file; retried (the commit log keeps them)");
            if let Err(te) = f.file.set_len(f.len) {
                tracing::error!(file = %path.display(), error = %te, "could not cut back a failed write");
            }
            cut.insert(key.clone());
            files.put(key.clone(), f);
            Err(e)
        }
    }
}

/// Opens (creating it and its folder if needed) a file for appending; a full cache closes its
/// least recently used handle first, so the thread never holds more than its bound.
fn open<K: Hash + Eq>(
    files: &mut LruCache<K, Open>,
    path: &std::path::Path,
) -> Result<Open, StoreError> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    }
    if files.len() >= files.cap().get() {
        files.pop_lru();
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    let len = file.metadata().map_err(|e| io_err(path, e))?.len();
    Ok(Open { file, len })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::file::shard::fault;

    /// Hands `data` over as the next lines of `path`, the way the shard does.
    fn hand(
        w: &mut Writer<&'static str>,
        behind: &mut Behind<&'static str>,
        path: &std::path::Path,
        at: u64,
        g: u64,
        data: &[u8],
    ) {
        behind.push(&"f", at, g, data);
        let lines = behind.take(&"f").unwrap();
        assert!(w.send("f", path.to_path_buf(), lines).is_ok());
    }

    #[test]
    fn a_failed_write_and_those_behind_it_wait_again_as_one_run() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("new-folder").join("q.dat");
        let mut w: Writer<&'static str> = Writer::start(0, 2, None);
        let mut behind = Behind::new();
        let mut lens = Vec::new();
        hand(&mut w, &mut behind, &path, 0, 1, b"one\n");
        w.wait(None, &mut behind, &mut |_, len| lens.push(len))
            .unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"one\n",
            "folder and file created"
        );

        // The first of two writes fails half-way; the second was already handed over.
        fault::fail_next_write(&path, 2, std::io::ErrorKind::StorageFull);
        hand(&mut w, &mut behind, &path, 4, 1, b"two\n");
        hand(&mut w, &mut behind, &path, 8, 2, b"three\n");
        assert_eq!(w.end(&"f"), Some(14));
        assert_eq!(w.oldest_generation(), Some(1));
        // A line logged meanwhile waits behind them.
        behind.push(&"f", 14, 2, b"four\n");
        let r = w.wait(Some(&["f"]), &mut behind, &mut |_, len| lens.push(len));
        assert!(matches!(r, Err(StoreError::Io { .. })), "{r:?}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"one\n",
            "cut back, nothing after it"
        );
        assert_eq!((w.end(&"f"), w.oldest_generation()), (None, None));
        let again = behind.take(&"f").unwrap();
        assert_eq!((again.base, again.generation), (4, 1));
        assert_eq!(again.bytes, b"two\nthree\nfour\n");

        // Retried from where the file ends, they land in order.
        assert!(w.send("f", path.clone(), again).is_ok());
        w.wait(Some(&["f"]), &mut behind, &mut |_, len| lens.push(len))
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one\ntwo\nthree\nfour\n");
        assert_eq!(lens, [4, 19]);
        w.finish();
        fault::clear(&path);
    }

    #[test]
    fn each_file_written_is_noted_once_for_the_next_checkpoint() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("q.dat");
        let written = Written::default();
        let mut w: Writer<&'static str> = Writer::start(0, 2, Some(written.clone()));
        let mut behind = Behind::new();
        hand(&mut w, &mut behind, &path, 0, 1, b"one\n");
        hand(&mut w, &mut behind, &path, 4, 1, b"two\n");
        w.wait(None, &mut behind, &mut |_, _| {}).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one\ntwo\n");
        let noted: Vec<PathBuf> = written.lock().unwrap().iter().cloned().collect();
        assert_eq!(noted, [path]);
        w.finish();
    }
}
