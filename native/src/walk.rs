//! commit's walk (imgstore/scan.py: `walk`, `walk_cached`), in a thread of its own, ahead of the commit's Python
//! loop ("Commit's walk and stat cache merge, sessions 18-19" in docs/benchmarks.md). It yields what scan._walk
//! yields, in the same order (siblings in name-byte order, depth first), skips and reports the same things (other
//! filesystems, sockets, excluded paths); for walk_cached it also looks each entry up in the stat cache
//! (merge.rs) and hands over runs of entries found as they were. Directories are opened one component at a time
//! below the root (no symlink followed, no path length limit); the thread starts with the first chunk asked for,
//! not before (the commit holds the store lock by then, and its scan start is taken).

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::mpsc;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use crate::merge::{Merge, Row, KEY_LEN};

const CHUNK: usize = 512; // entries handed over at a time
const CHUNKS_AHEAD: usize = 64; // chunks the thread may be ahead of the loop: memory stays bounded
const KEEP_OPEN: usize = 128; // directory levels kept open below the root (the deepest ones): paths may nest
                                // thousands of directories deep, descriptors are limited

/// What the walk saw of an entry (os.lstat's fields that commit uses), under os.stat_result's names.
#[pyclass(module = "imgstore._native")]
pub struct Stat {
    #[pyo3(get)]
    st_mode: u32,
    #[pyo3(get)]
    st_ino: u64,
    #[pyo3(get)]
    st_dev: u64,
    #[pyo3(get)]
    st_nlink: u64,
    #[pyo3(get)]
    st_uid: u32,
    #[pyo3(get)]
    st_gid: u32,
    #[pyo3(get)]
    st_size: i64,
    #[pyo3(get)]
    st_blocks: i64,
    #[pyo3(get)]
    st_rdev: u64,
    #[pyo3(get)]
    st_mtime_ns: i128,
    #[pyo3(get)]
    st_ctime_ns: i128,
    /// statcache.key() of it, made here (getters cost): None where a time does not fit, for Python to say so
    #[pyo3(get)]
    key: Option<PyObject>,
}

/// statcache.KEY: "<QqqqIQII?", little-endian, packed.
fn cache_key(st: &libc::stat, mtime_ns: i128, ctime_ns: i128) -> Option<[u8; KEY_LEN]> {
    let mut k = [0u8; KEY_LEN];
    k[0..8].copy_from_slice(&st.st_ino.to_le_bytes());
    k[8..16].copy_from_slice(&st.st_size.to_le_bytes());
    k[16..24].copy_from_slice(&i64::try_from(mtime_ns).ok()?.to_le_bytes());
    k[24..32].copy_from_slice(&i64::try_from(ctime_ns).ok()?.to_le_bytes());
    k[32..36].copy_from_slice(&st.st_mode.to_le_bytes());
    k[36..44].copy_from_slice(&st.st_nlink.to_le_bytes());
    k[44..48].copy_from_slice(&st.st_uid.to_le_bytes());
    k[48..52].copy_from_slice(&st.st_gid.to_le_bytes());
    k[52] = u8::from(st.st_blocks.saturating_mul(512) < st.st_size);
    Some(k)
}

/// mtime and ctime in nanoseconds.
fn times(st: &libc::stat) -> (i128, i128) {
    (i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec),
     i128::from(st.st_ctime) * 1_000_000_000 + i128::from(st.st_ctime_nsec))
}

impl Stat {
    fn of(py: Python<'_>, st: &libc::stat) -> Stat {
        let (mtime_ns, ctime_ns) = times(st);
        Stat {
            st_mode: st.st_mode,
            st_ino: st.st_ino,
            st_dev: st.st_dev,
            st_nlink: st.st_nlink,
            st_uid: st.st_uid,
            st_gid: st.st_gid,
            st_size: st.st_size,
            st_blocks: st.st_blocks,
            st_rdev: st.st_rdev,
            st_mtime_ns: mtime_ns,
            st_ctime_ns: ctime_ns,
            key: cache_key(st, mtime_ns, ctime_ns).map(|k| PyBytes::new(py, &k).into()),
        }
    }
}

/// An exclude pattern (scan.compile_excludes): '*' and '?' stay inside one name, '**' crosses '/'.
enum Tok {
    Lit(Vec<u8>),
    One,
    Star,
    Any,
}

fn parse(mut pat: &[u8]) -> Vec<Tok> {
    while let [rest @ .., b'/'] = pat {
        pat = rest; // a trailing '/' matches the directory itself, as compile_excludes strips it
    }
    let mut toks = Vec::new();
    let mut i = 0;
    while i < pat.len() {
        match pat[i] {
            b'*' if pat.get(i + 1) == Some(&b'*') => {
                toks.push(Tok::Any);
                i += 2;
                continue;
            }
            b'*' => toks.push(Tok::Star),
            b'?' => toks.push(Tok::One),
            c => match toks.last_mut() {
                Some(Tok::Lit(lit)) => lit.push(c),
                _ => toks.push(Tok::Lit(vec![c])),
            },
        }
        i += 1;
    }
    toks
}

fn matches(toks: &[Tok], s: &[u8]) -> bool {
    match toks.first() {
        None => s.is_empty(),
        Some(Tok::Lit(lit)) => s.starts_with(lit) && matches(&toks[1..], &s[lit.len()..]),
        Some(Tok::One) => matches!(s.first(), Some(&b) if b != b'/') && matches(&toks[1..], &s[1..]),
        Some(Tok::Star) => {
            let mut i = 0;
            loop {
                if matches(&toks[1..], &s[i..]) {
                    return true;
                }
                if i == s.len() || s[i] == b'/' {
                    return false;
                }
                i += 1;
            }
        }
        Some(Tok::Any) => (0..=s.len()).any(|i| matches(&toks[1..], &s[i..])),
    }
}

enum Child {
    Entry(libc::stat),
    Mount,
    Socket,
}

struct Level {
    fd: libc::c_int, // -1 when closed: KEEP_OPEN deeper levels are open
    prefix: Vec<u8>, // the directory's path below the root, with a trailing '/' (empty for the root)
    children: std::vec::IntoIter<(Vec<u8>, Child)>,
}

/// Consecutive entries the stat cache found as they were and that Python need not look at one by one: no
/// symlink, no later path of a hardlinked inode, no file whose cached line is not a file's, nothing Python keeps
/// (commit._LOOKED_AT, boot/), and no entry after the first miss but at its start.
#[derive(Default)]
struct RunData {
    lines: Vec<u8>,
    records: Vec<u8>,
    digests: Vec<u8>,
    files: usize,
    size: i64,
    stats: Vec<libc::stat>, // the entries' paths, keys and lines are in `records`
}

enum Item {
    Entry(Vec<u8>, libc::stat, Option<Vec<u8>>, Option<Row>),
    Run(RunData),
}

#[derive(Default)]
struct Chunk {
    items: Vec<Item>,
    entries: usize,
    mounts: Vec<Vec<u8>>,
    sockets: Vec<Vec<u8>>,
    excluded: usize,
    first_miss: Option<usize>,
    error: Option<(i32, Vec<u8>, bool)>, // errno, path below the root, whether listing the directory failed
}

/// What the walk looks up in the stat cache, and what Python keeps of the entries it finds there.
struct Cached {
    merge: Merge,
    looked_at: Vec<Vec<u8>>,
    prefixes: Vec<Vec<u8>>,
    run: Option<RunData>,
    at: usize,
}

struct Walk {
    dev: u64,
    excludes: Vec<Vec<Tok>>,
    links: HashMap<u64, Vec<u8>>,
    chunk: Chunk,
    cached: Option<Cached>,
    tx: mpsc::SyncSender<Chunk>,
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

fn open_in(dir: libc::c_int, name: &[u8]) -> Result<libc::c_int, i32> {
    let name = CString::new(name).map_err(|_| libc::EINVAL)?;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: a valid directory descriptor and a NUL-terminated name.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags) };
    if fd < 0 {
        Err(errno())
    } else {
        Ok(fd)
    }
}

fn close(fd: libc::c_int) {
    if fd >= 0 {
        // SAFETY: a descriptor this walk opened and owns.
        unsafe { libc::close(fd) };
    }
}

/// The names in a directory, sorted by bytes.
fn names(fd: libc::c_int) -> Result<Vec<Vec<u8>>, i32> {
    // SAFETY: fdopendir takes the duplicate, closedir closes it; entries are copied before the next readdir.
    unsafe {
        let dup = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0);
        if dup < 0 {
            return Err(errno());
        }
        let dir = libc::fdopendir(dup);
        if dir.is_null() {
            let e = errno();
            libc::close(dup);
            return Err(e);
        }
        let mut out = Vec::new();
        loop {
            *libc::__errno_location() = 0;
            let ent = libc::readdir(dir);
            if ent.is_null() {
                let e = *libc::__errno_location();
                libc::closedir(dir);
                if e != 0 {
                    return Err(e);
                }
                break;
            }
            let name = std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()).to_bytes();
            if name != b"." && name != b".." {
                out.push(name.to_vec());
            }
        }
        out.sort_unstable();
        Ok(out)
    }
}

fn end_run(run: &mut Option<RunData>, chunk: &mut Chunk) {
    if let Some(run) = run.take() {
        chunk.items.push(Item::Run(run));
    }
}

impl Walk {
    /// An entry for the chunk: in a run if the stat cache has it as it was and Python need not look at it.
    fn push(&mut self, rel: Vec<u8>, st: libc::stat, first: Option<Vec<u8>>) {
        let chunk = &mut self.chunk;
        chunk.entries += 1;
        let c = match self.cached.as_mut() {
            Some(c) => c,
            None => return chunk.items.push(Item::Entry(rel, st, first, None)),
        };
        let at = c.at;
        c.at += 1;
        let kept = c.looked_at.iter().any(|p| *p == rel) || c.prefixes.iter().any(|p| rel.starts_with(p));
        let (mtime_ns, ctime_ns) = times(&st);
        let key = cache_key(&st, mtime_ns, ctime_ns);
        let hit = c.merge.lookup(at, &rel, key.as_ref().map(|k| &k[..]), ctime_ns);
        let miss_here = c.merge.first_miss == Some(at);
        let row = if hit { Some(c.merge.found()) } else { None };
        let digest = match (row, st.st_mode & libc::S_IFMT) {
            (Some(_), libc::S_IFDIR | libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO) => Some(None),
            (Some(row), libc::S_IFREG) if first.is_none() => row.file_digest().map(Some),
            _ => None,
        };
        match (row, digest) {
            (Some(row), Some(digest)) if !kept => {
                if miss_here {
                    end_run(&mut c.run, chunk); // a run holds no miss but at its start (statcache records from it)
                }
                let run = c.run.get_or_insert_with(RunData::default);
                run.lines.extend_from_slice(row.line());
                run.records.extend_from_slice(&row.record);
                if let Some(d) = digest {
                    run.digests.extend_from_slice(&d);
                    run.files += 1;
                    run.size += st.st_size;
                }
                run.stats.push(st);
            }
            (row, _) => {
                let row = row.cloned();
                end_run(&mut c.run, chunk);
                chunk.items.push(Item::Entry(rel, st, first, row));
            }
        }
    }

    fn send(&mut self) -> bool {
        if let Some(c) = self.cached.as_mut() {
            end_run(&mut c.run, &mut self.chunk);
            self.chunk.first_miss = c.merge.first_miss;
        }
        let chunk = std::mem::take(&mut self.chunk);
        self.tx.send(chunk).is_ok() // an error: the loop stopped (commit failed) and dropped the walker
    }

    fn fail(&mut self, errno: i32, rel: Vec<u8>, listing: bool) {
        self.chunk.error = Some((errno, rel, listing));
        self.send();
    }

    /// The directory's children as scan._walk judges them, lstat'd; None after an error (reported).
    fn list(&mut self, fd: libc::c_int, prefix: &[u8]) -> Option<Vec<(Vec<u8>, Child)>> {
        let names = match names(fd) {
            Ok(names) => names,
            Err(e) => {
                self.fail(e, prefix[..prefix.len().saturating_sub(1)].to_vec(), true);
                return None;
            }
        };
        let mut out = Vec::with_capacity(names.len());
        let mut path = Vec::with_capacity(prefix.len() + 65);
        for name in names {
            path.clear();
            path.push(b'/');
            path.extend_from_slice(prefix);
            path.extend_from_slice(&name);
            if self.excludes.iter().any(|toks| matches(toks, &path)) {
                self.chunk.excluded += 1;
                continue;
            }
            path.push(0); // the name NUL-terminated, in place (a name from readdir holds no NUL)
            let cname = path[1 + prefix.len()..].as_ptr() as *const libc::c_char;
            // SAFETY: a valid directory descriptor, a NUL-terminated name and a stat buffer of our own.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            let failed = unsafe { libc::fstatat(fd, cname, &mut st, libc::AT_SYMLINK_NOFOLLOW) } != 0;
            path.pop();
            if failed {
                match errno() {
                    libc::ENOENT => continue, // removed while we walk: simply not in this generation
                    e => {
                        self.fail(e, path[1..].to_vec(), false);
                        return None;
                    }
                }
            }
            let child = if st.st_dev != self.dev {
                Child::Mount
            } else {
                match st.st_mode & libc::S_IFMT {
                    libc::S_IFREG | libc::S_IFDIR | libc::S_IFLNK | libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO => {
                        Child::Entry(st)
                    }
                    _ => Child::Socket, // a socket (or something stranger)
                }
            };
            out.push((name, child));
        }
        Some(out)
    }

    /// The descriptor of stack[i]'s directory, reopened from the deepest level still open if it was closed.
    fn fd_of(stack: &mut [Level], i: usize) -> Result<libc::c_int, i32> {
        if stack[i].fd >= 0 {
            return Ok(stack[i].fd);
        }
        let j = (0..i).rev().find(|&j| stack[j].fd >= 0).expect("the root stays open");
        let (base_fd, rest) = (stack[j].fd, stack[i].prefix[stack[j].prefix.len()..].to_vec());
        let mut fd = base_fd;
        for part in rest.split(|&b| b == b'/').filter(|p| !p.is_empty()) {
            let next = open_in(fd, part);
            if fd != base_fd {
                close(fd);
            }
            fd = next?;
        }
        stack[i].fd = fd;
        Ok(fd)
    }

    fn run(&mut self, root: &[u8]) {
        let root_fd = match CString::new(root) {
            // SAFETY: a NUL-terminated path.
            Ok(p) => unsafe {
                libc::open(p.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            },
            Err(_) => -1,
        };
        if root_fd < 0 {
            let e = if root.contains(&0) { libc::EINVAL } else { errno() };
            return self.fail(e, Vec::new(), true);
        }
        // SAFETY: an open descriptor and a stat buffer of our own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(root_fd, &mut st) } != 0 {
            let e = errno();
            close(root_fd);
            return self.fail(e, Vec::new(), true);
        }
        self.push(b".".to_vec(), st, None);
        let children = match self.list(root_fd, b"") {
            Some(c) => c,
            None => return close(root_fd),
        };
        let mut stack = vec![Level { fd: root_fd, prefix: Vec::new(), children: children.into_iter() }];
        while let Some(top) = stack.last_mut() {
            let (name, child) = match top.children.next() {
                Some(next) => next,
                None => {
                    close(top.fd);
                    stack.pop();
                    continue;
                }
            };
            let mut rel = top.prefix.clone();
            rel.extend_from_slice(&name);
            let st = match child {
                Child::Mount => {
                    self.chunk.mounts.push(rel);
                    continue;
                }
                Child::Socket => {
                    self.chunk.sockets.push(rel);
                    continue;
                }
                Child::Entry(st) => st,
            };
            let kind = st.st_mode & libc::S_IFMT;
            let mut first = None;
            if kind == libc::S_IFREG && st.st_nlink > 1 {
                match self.links.get(&st.st_ino) {
                    Some(f) => first = Some(f.clone()),
                    None => {
                        self.links.insert(st.st_ino, rel.clone());
                    }
                }
            }
            self.push(rel.clone(), st, first);
            if kind == libc::S_IFDIR {
                let top = stack.len() - 1;
                let fd = match Walk::fd_of(&mut stack, top).and_then(|parent| open_in(parent, &name)) {
                    Ok(fd) => fd,
                    Err(libc::ENOENT) => continue, // removed while we walk
                    Err(e) => {
                        self.fail(e, rel, true);
                        break;
                    }
                };
                rel.push(b'/');
                let children = match self.list(fd, &rel) {
                    Some(c) => c,
                    None => {
                        close(fd);
                        break;
                    }
                };
                stack.push(Level { fd, prefix: rel, children: children.into_iter() });
                if stack.len() > KEEP_OPEN + 1 {
                    let k = stack.len() - 1 - KEEP_OPEN;
                    let shallow = &mut stack[k]; // reopened if it has more to list
                    close(shallow.fd);
                    shallow.fd = -1;
                }
            }
            if self.chunk.entries >= CHUNK && !self.send() {
                break;
            }
        }
        for level in stack {
            close(level.fd);
        }
        if self.chunk.error.is_none() {
            if let Some(c) = self.cached.as_mut() {
                c.merge.finish(c.at);
            }
            self.send();
        }
    }
}

/// A run of entries the stat cache has as they were (RunData): `n` of them, their manifest lines and cache
/// records joined, the raw digests of the files among them, how many files and bytes those are; items() gives
/// them one by one, as the walk gives other entries (for commit to look at after all, when a file's content is no
/// longer stored).
#[pyclass(module = "imgstore._native")]
pub struct Run {
    #[pyo3(get)]
    n: usize,
    #[pyo3(get)]
    lines: PyObject,
    #[pyo3(get)]
    records: Py<PyBytes>,
    #[pyo3(get)]
    digests: PyObject,
    #[pyo3(get)]
    files: usize,
    #[pyo3(get)]
    size: i64,
    root: Vec<u8>,
    stats: Vec<libc::stat>,
}

#[pymethods]
impl Run {
    fn items(&self, py: Python<'_>) -> PyResult<Py<PyList>> {
        let items = PyList::empty(py);
        let records = self.records.as_ref(py).as_bytes();
        let mut pos = 0;
        for st in &self.stats {
            let (row, len) = Row::parse(&records[pos..]);
            pos += len;
            items.append(entry(py, &self.root, row.path(), st, None, Some(Some(&row)))?)?;
        }
        Ok(items.into())
    }
}

/// An entry as Python gets it: (path, absolute path, Stat, first path of its inode or None), and where the walk
/// looks the stat cache up, its row (path, key, line) or None.
fn entry(py: Python<'_>, root: &[u8], rel: &[u8], st: &libc::stat, first: Option<&[u8]>,
         row: Option<Option<&Row>>) -> PyResult<PyObject> {
    let mut abs = root.to_vec();
    if rel != b"." {
        abs.push(b'/');
        abs.extend_from_slice(rel);
    }
    let mut item: Vec<PyObject> = vec![
        PyBytes::new(py, rel).into(),
        PyBytes::new(py, &abs).into(),
        Py::new(py, Stat::of(py, st))?.into_py(py),
        first.map(|f| PyBytes::new(py, f)).into_py(py),
    ];
    if let Some(row) = row {
        item.push(row.map(|r| (PyBytes::new(py, r.path()), PyBytes::new(py, r.key()), PyBytes::new(py, r.line())))
            .into_py(py));
    }
    Ok(PyTuple::new(py, item).into())
}

/// Iterates over chunks: (entries, paths on other filesystems, sockets, how many paths were excluded, the first
/// entry the stat cache did not have as it was or None, (errno, path, listing) of an error or None). The root
/// is the first entry, as ".". Entries are as entry() makes them; with a stat cache, runs of them are Run.
#[pyclass(module = "imgstore._native")]
pub struct Walker {
    root: Vec<u8>,
    dev: u64,
    excludes: Vec<Vec<u8>>,
    cache: Option<(Vec<u8>, i128, Vec<Vec<u8>>, Vec<Vec<u8>>)>,
    merges: bool,
    rx: Option<mpsc::Receiver<Chunk>>,
    done: bool,
}

#[pymethods]
impl Walker {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<PyObject>> {
        if self.done {
            return Ok(None);
        }
        let rx = match self.rx.take() {
            Some(rx) => rx,
            None => {
                let (tx, rx) = mpsc::sync_channel(CHUNKS_AHEAD);
                let cache = self.cache.take();
                let root = self.root.clone();
                let mut walk = Walk {
                    dev: self.dev,
                    excludes: self.excludes.iter().map(|p| parse(p)).collect(),
                    links: HashMap::new(),
                    chunk: Chunk::default(),
                    cached: None,
                    tx,
                };
                std::thread::Builder::new()
                    .name("imgstore-walk".into())
                    .spawn(move || {
                        // The old cache is opened here, in the thread: the commit holds the store lock by now.
                        walk.cached = cache.map(|(path, margin, looked_at, prefixes)| Cached {
                            merge: Merge::open(&path, &root, margin),
                            looked_at,
                            prefixes,
                            run: None,
                            at: 0,
                        });
                        walk.run(&root)
                    })
                    .map_err(|e| pyo3::exceptions::PyOSError::new_err(e.to_string()))?;
                rx
            }
        };
        let (rx, got) = py.allow_threads(move || {
            let got = rx.recv();
            (rx, got)
        });
        self.rx = Some(rx);
        let chunk = match got {
            Ok(chunk) => chunk,
            Err(_) => {
                self.done = true; // the thread finished (or panicked: an error chunk would have said why)
                return Ok(None);
            }
        };
        if chunk.error.is_some() {
            self.done = true;
        }
        let items = PyList::empty(py);
        for item in chunk.items {
            match item {
                Item::Entry(rel, st, first, row) => {
                    let row = if self.merges { Some(row.as_ref()) } else { None };
                    items.append(entry(py, &self.root, &rel, &st, first.as_deref(), row)?)?;
                }
                Item::Run(run) => {
                    let run = Run {
                        n: run.stats.len(),
                        lines: PyBytes::new(py, &run.lines).into(),
                        records: PyBytes::new(py, &run.records).into(),
                        digests: PyList::new(py, run.digests.chunks(32).map(|d| PyBytes::new(py, d))).into(),
                        files: run.files,
                        size: run.size,
                        root: self.root.clone(),
                        stats: run.stats,
                    };
                    items.append(Py::new(py, run)?)?;
                }
            }
        }
        let bytes_list = |v: &[Vec<u8>]| PyList::new(py, v.iter().map(|p| PyBytes::new(py, p)));
        let error = chunk.error.as_ref().map(|(e, p, listing)| (*e, PyBytes::new(py, p), *listing));
        Ok(Some((items, bytes_list(&chunk.mounts), bytes_list(&chunk.sockets), chunk.excluded, chunk.first_miss, error)
            .into_py(py)))
    }
}

/// A walker of the tree at `root` (a directory on device `dev`), skipping paths an exclude pattern matches.
/// With `cache` (the stat cache's path, statcache.MARGIN_NS, the paths and path prefixes whose entries commit
/// keeps), each entry is looked up in that cache as the walk goes.
#[pyfunction]
pub fn walk_tree(root: Vec<u8>, dev: u64, excludes: Vec<Vec<u8>>,
                 cache: Option<(Vec<u8>, i128, Vec<Vec<u8>>, Vec<Vec<u8>>)>) -> Walker {
    let merges = cache.is_some();
    Walker { root, dev, excludes, cache, merges, rx: None, done: false }
}

/// Whether the exclude patterns match `path` (the tests compare it with scan.compile_excludes).
#[pyfunction]
pub fn exclude_matches(patterns: Vec<Vec<u8>>, path: Vec<u8>) -> bool {
    patterns.iter().any(|p| matches(&parse(p), &path))
}
