//! imgstore's native loops (docs/benchmarks.md): commit's read loop ("First commit, session 11: the read loop
//! in Rust"), the write and link loops of materialize and checkout ("Materialize, session 16", "Materialize and
//! checkout, session 17"; imgstore/fill.py), and commit's walk (walk.rs).
//!
//! `read_files` reads a run of small regular files back to back into a caller's buffer and hashes each
//! with BLAKE3, all with the GIL released: the Python loop it replaces released and took back the GIL
//! five times a file (open, fstat, read, fstat, close), and on two cores the commit's three threads spent
//! a tenth of their CPU handing it over. It never decides anything: a file that is not exactly what the
//! walk saw (same inode, size, mtime and ctime, before and after the read) ends the run with None, and
//! Python reads that one itself, with its retries and its error messages.

use std::borrow::Cow;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;

use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

mod merge;
mod walk;

struct Wanted {
    path: Option<CString>,
    ino: u64,
    size: usize,
    mtime_ns: i128,
    ctime_ns: i128,
}

fn same(st: &libc::stat, w: &Wanted) -> bool {
    (st.st_mode & libc::S_IFMT) == libc::S_IFREG
        && st.st_ino == w.ino
        && st.st_size as usize == w.size
        && st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128 == w.mtime_ns
        && st.st_ctime as i128 * 1_000_000_000 + st.st_ctime_nsec as i128 == w.ctime_ns
}

/// Reads one file into `out` (exactly w.size bytes); its digest, or None if it is not what was wanted.
fn read_one(w: &Wanted, out: &mut [u8]) -> Option<[u8; 32]> {
    let path = w.path.as_ref()?;
    if w.size > out.len() {
        return None;
    }
    // SAFETY: plain system calls on a file descriptor this function owns and closes; `out` is a valid,
    // writable slice of at least w.size bytes.
    unsafe {
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK;
        let fd = libc::open(path.as_ptr(), flags);
        if fd < 0 {
            return None;
        }
        let mut before: libc::stat = std::mem::zeroed();
        let mut after: libc::stat = std::mem::zeroed();
        let mut n = 0usize;
        let mut ok = libc::fstat(fd, &mut before) == 0 && same(&before, w);
        while ok && n < w.size {
            let got = libc::read(fd, out.as_mut_ptr().add(n) as *mut libc::c_void, w.size - n);
            if got < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            if got <= 0 {
                ok = false;
            } else {
                n += got as usize;
            }
        }
        ok = ok && libc::fstat(fd, &mut after) == 0 && same(&after, w);
        libc::close(fd);
        if !ok {
            return None;
        }
    }
    Some(*blake3::hash(&out[..w.size]).as_bytes())
}

/// read_files(files, buf, offset, limit) -> list of 32-byte digests, then possibly one None.
///
/// `files`: (absolute path, st_ino, st_size, st_mtime_ns, st_ctime_ns) as the walk saw them. File i is
/// read into buf[offset:offset + size], the next one right after it, while offset < limit. The list
/// returned covers the files read, in order; a None in last place marks the file Python must read.
#[pyfunction]
fn read_files(py: Python<'_>, files: &PyList, buf: &PyAny, offset: usize, limit: usize) -> PyResult<PyObject> {
    let view = PyBuffer::<u8>::get(buf)?;
    if view.readonly() || !view.is_c_contiguous() {
        return Err(pyo3::exceptions::PyTypeError::new_err("read_files needs a writable, contiguous buffer"));
    }
    let mut wanted = Vec::with_capacity(files.len());
    for item in files.iter() {
        let (path, ino, size, mtime_ns, ctime_ns): (&[u8], u64, usize, i128, i128) = item.extract()?;
        wanted.push(Wanted { path: CString::new(path).ok(), ino, size, mtime_ns, ctime_ns });
    }
    let (base, len) = (view.buf_ptr() as usize, view.len_bytes());
    if offset > len {
        return Err(pyo3::exceptions::PyValueError::new_err("offset past the end of the buffer"));
    }
    let digests: Vec<Option<[u8; 32]>> = py.allow_threads(|| {
        // SAFETY: the buffer stays exported (and so neither freed nor resized) while `view` lives, which
        // is until this function returns; the caller does not touch it meanwhile (one block per thread).
        let whole = unsafe { std::slice::from_raw_parts_mut(base as *mut u8, len) };
        let mut out = Vec::with_capacity(wanted.len());
        let mut at = offset;
        for w in &wanted {
            if at >= limit {
                break;
            }
            let d = read_one(w, &mut whole[at..]);
            out.push(d);
            match d {
                Some(_) => at += w.size,
                None => break,
            }
        }
        out
    });
    drop(view);
    let list = PyList::empty(py);
    for d in digests {
        match d {
            Some(raw) => list.append(PyBytes::new(py, &raw))?,
            None => list.append(py.None())?,
        }
    }
    Ok(list.into())
}

/// Where a new file's content comes from.
enum Source {
    Block { inner: usize },  // the group's decompressed block, at this offset
    Loose { object: CString }, // a loose object: one zstd stream (of one or more frames)
    Symlink { target: CString },
}

/// One file or symlink for fill: where, what, and the metadata the manifest records.
struct Make {
    path: CString,
    source: Source,
    size: usize,
    digest: Vec<u8>,
    sparse: bool,
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: libc::timespec,
    xattrs: Vec<(CString, Vec<u8>)>,
}

/// The files of one block of a pack (or loose files and symlinks, with pack -1).
struct Group {
    pack: libc::c_int,
    offset: u64,
    clen: usize,
    makes: Vec<Option<Make>>, // None: what the system could not take (a NUL byte), for Python to make and name
}

const PRIVILEGED_XATTRS: [&[u8]; 2] = [b"security.", b"trusted."];
const MAX_BLOCK: usize = 2 << 20; // objects.MAX_BLOCK: a frame that claims more is refused
const ZERO_BLOCK: usize = 4096; // checkout.ZERO_BLOCK: a sparse file's all-zero blocks become holes
const CHUNK: usize = 1 << 20;

fn wanted_xattrs<'a>(m: &'a Make, own: bool) -> impl Iterator<Item = &'a (CString, Vec<u8>)> {
    m.xattrs.iter().filter(move |(k, _)| own || !PRIVILEGED_XATTRS.iter().any(|p| k.as_bytes().starts_with(p)))
}

/// Writes `data` at `pos` of fd: all of it, or only its blocks that are not all zero when `sparse`.
///
/// SAFETY (of the caller): fd is an open descriptor.
unsafe fn write_at(fd: libc::c_int, data: &[u8], pos: usize, sparse: bool) -> bool {
    if sparse {
        return data.chunks(ZERO_BLOCK).enumerate().all(|(i, piece)| {
            piece.iter().all(|&b| b == 0) || write_at(fd, piece, pos + i * ZERO_BLOCK, false)
        });
    }
    let mut n = 0usize;
    while n < data.len() {
        let at = (pos + n) as libc::off_t;
        let got = libc::pwrite(fd, data.as_ptr().add(n) as *const libc::c_void, data.len() - n, at);
        if got < 0 && *libc::__errno_location() == libc::EINTR {
            continue;
        }
        if got <= 0 {
            return false;
        }
        n += got as usize;
    }
    true
}

/// Reads until `buf` is full or the stream ends; how much was read, None on an error.
fn fill_buf(r: &mut impl std::io::Read, buf: &mut [u8]) -> Option<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(got) => n += got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    }
    Some(n)
}

/// Writes a loose object's content into fd, checking its size and digest as it goes.
///
/// SAFETY (of the caller): fd is an open descriptor.
unsafe fn write_loose(fd: libc::c_int, object: &CString, m: &Make, buf: &mut Vec<u8>) -> bool {
    let path = std::path::Path::new(std::ffi::OsStr::from_bytes(object.as_bytes()));
    let mut stream = match std::fs::File::open(path).and_then(zstd::stream::read::Decoder::new) {
        Ok(stream) => stream,
        Err(_) => return false,
    };
    buf.resize(CHUNK, 0);
    let mut hasher = blake3::Hasher::new();
    let mut pos = 0usize;
    loop {
        let n = match fill_buf(&mut stream, &mut buf[..]) {
            Some(n) => n,
            None => return false,
        };
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if pos + n > m.size || !write_at(fd, &buf[..n], pos, m.sparse) {
            return false;
        }
        pos += n;
    }
    pos == m.size && hasher.finalize().as_bytes()[..] == m.digest[..]
}

/// Makes one regular file below root_fd, as checkout.make_new does: content, then owner (which clears setuid
/// and capabilities), xattrs, mode, times. False (and nothing left behind) on any failure or a content that
/// does not hash to its digest. The file is created with its final permission bits, never its special ones
/// (until `fchown` it is its creator's, so at most the creator's group reads more than the finished file
/// allows; below the top of the tree the directories are 0700 until restore's pass), and an `fstat` tells
/// whether `fchown` and `fchmod` are needed: most files of a rootfs are root's with a mode the umask leaves
/// alone, two calls fewer each.
fn make_file(root_fd: libc::c_int, block: Option<&[u8]>, m: &Make, own: bool, buf: &mut Vec<u8>) -> bool {
    let content = match (&m.source, block) {
        (Source::Block { inner }, Some(block)) => match inner.checked_add(m.size).and_then(|e| block.get(*inner..e)) {
            Some(c) if blake3::hash(c).as_bytes()[..] == m.digest[..] => Some(c),
            _ => return false,
        },
        (Source::Loose { .. }, _) => None,
        _ => return false,
    };
    // SAFETY: plain system calls on a descriptor this function owns and closes; the pointers passed are
    // valid NUL-terminated strings and slices that outlive the calls.
    unsafe {
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        let fd = libc::openat(root_fd, m.path.as_ptr(), flags, (m.mode & 0o777) as libc::c_uint);
        if fd < 0 {
            return false;
        }
        let mut ok = match (&m.source, content) {
            (_, Some(c)) => write_at(fd, c, 0, m.sparse),
            (Source::Loose { object }, None) => write_loose(fd, object, m, buf),
            _ => false,
        };
        ok = ok && (!m.sparse || libc::ftruncate(fd, m.size as libc::off_t) == 0);
        let mut st: libc::stat = std::mem::zeroed();
        ok = ok && libc::fstat(fd, &mut st) == 0;
        let chown = own && (st.st_uid != m.uid || st.st_gid != m.gid);
        ok = ok && (!chown || libc::fchown(fd, m.uid, m.gid) == 0);
        let mut xattrs = false; // an ACL's xattr sets the mode's bits too: fchmod after it, as always
        for (k, v) in wanted_xattrs(m, own) {
            xattrs = true;
            ok = ok && libc::fsetxattr(fd, k.as_ptr(), v.as_ptr() as *const libc::c_void, v.len(), 0) == 0;
        }
        let exact = !chown && !xattrs && st.st_mode & 0o7777 == m.mode as libc::mode_t;
        ok = ok && (exact || libc::fchmod(fd, m.mode as libc::mode_t) == 0);
        let times = [m.mtime, m.mtime];
        ok = ok && libc::futimens(fd, times.as_ptr()) == 0;
        ok = libc::close(fd) == 0 && ok;
        if !ok {
            libc::unlinkat(root_fd, m.path.as_ptr(), 0);
        }
        ok
    }
}

/// Makes one symlink below root_fd, as checkout.make_new does: owner, xattrs (through /proc: there is no
/// lsetxattrat), times, none of them following it.
fn make_symlink(root_fd: libc::c_int, m: &Make, target: &CString, own: bool) -> bool {
    // SAFETY: as in make_file; no descriptor is opened.
    unsafe {
        if libc::symlinkat(target.as_ptr(), root_fd, m.path.as_ptr()) != 0 {
            return false;
        }
        let nofollow = libc::AT_SYMLINK_NOFOLLOW;
        let mut ok = !own || libc::fchownat(root_fd, m.path.as_ptr(), m.uid, m.gid, nofollow) == 0;
        let mut xattrs = wanted_xattrs(m, own).peekable();
        if ok && xattrs.peek().is_some() {
            let mut via = format!("/proc/self/fd/{}/", root_fd).into_bytes();
            via.extend_from_slice(m.path.as_bytes());
            match CString::new(via) {
                Ok(via) => {
                    for (k, v) in xattrs {
                        ok = ok
                            && libc::lsetxattr(via.as_ptr(), k.as_ptr(), v.as_ptr() as *const libc::c_void, v.len(), 0)
                                == 0;
                    }
                }
                Err(_) => ok = false,
            }
        }
        let times = [m.mtime, m.mtime];
        ok = ok && libc::utimensat(root_fd, m.path.as_ptr(), times.as_ptr(), nofollow) == 0;
        if !ok {
            libc::unlinkat(root_fd, m.path.as_ptr(), 0);
        }
        ok
    }
}

/// The decompressed block of a group (pread of its frame, then zstd), into `out`; false if it cannot be read
/// or is not a frame of at most MAX_BLOCK bytes.
fn read_block(g: &Group, z: &mut zstd::bulk::Decompressor<'_>, frame: &mut Vec<u8>, out: &mut Vec<u8>) -> bool {
    frame.resize(g.clen, 0);
    let mut n = 0usize;
    while n < g.clen {
        // SAFETY: a read into the owned buffer's remaining g.clen - n bytes.
        let got = unsafe {
            libc::pread(g.pack, frame.as_mut_ptr().add(n) as *mut libc::c_void, g.clen - n,
                        (g.offset as usize + n) as libc::off_t)
        };
        if got < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if got <= 0 {
            return false;
        }
        n += got as usize;
    }
    out.clear();
    out.reserve(MAX_BLOCK);
    z.decompress_to_buffer(&frame[..], out).is_ok()
}

/// Makes a group's entries; pushes (group, entry) of each it could not make.
fn fill_group(
    root_fd: libc::c_int, gi: usize, g: &Group, own: bool, z: &mut zstd::bulk::Decompressor<'_>, bufs: &mut Buffers,
    failed: &mut Vec<(usize, usize)>,
) {
    let block = if g.pack >= 0 {
        if read_block(g, z, &mut bufs.frame, &mut bufs.block) {
            Some(&bufs.block[..])
        } else {
            failed.extend((0..g.makes.len()).map(|i| (gi, i)));
            return;
        }
    } else {
        None
    };
    for (i, m) in g.makes.iter().enumerate() {
        let ok = match m {
            Some(m @ Make { source: Source::Symlink { target }, .. }) => make_symlink(root_fd, m, target, own),
            Some(m) => make_file(root_fd, block, m, own, &mut bufs.chunk),
            None => false,
        };
        if !ok {
            failed.push((gi, i));
        }
    }
}

#[derive(Default)]
struct Buffers {
    frame: Vec<u8>,
    block: Vec<u8>,
    chunk: Vec<u8>,
}

type Meta = (u32, u32, u32, i128); // uid, gid, mode, mtime_ns (ext4 keeps times to 2446, past i64's 2262)
type Xattrs<'a> = Vec<(&'a [u8], &'a [u8])>;
type MakeItem<'a> = (&'a [u8], Option<&'a [u8]>, Option<&'a [u8]>, usize, usize, &'a [u8], Meta, Xattrs<'a>, bool);

fn to_make(item: &PyAny) -> PyResult<Option<Make>> {
    let item: MakeItem = item.extract()?;
    let (path, target, object, inner, size, digest, (uid, gid, mode, mtime_ns), xattrs, sparse) = item;
    let path = match CString::new(path) {
        Ok(path) => path,
        Err(_) => return Ok(None), // a name with a NUL byte: Python refuses it with its own message
    };
    let source = match (target.map(CString::new).transpose(), object.map(CString::new).transpose()) {
        (Ok(Some(target)), _) => Source::Symlink { target },
        (Ok(None), Ok(Some(object))) => Source::Loose { object },
        (Ok(None), Ok(None)) => Source::Block { inner },
        _ => return Ok(None),
    };
    let named: Result<Vec<(CString, Vec<u8>)>, _> =
        xattrs.into_iter().map(|(k, v)| CString::new(k).map(|k| (k, v.to_vec()))).collect();
    let xattrs = match named {
        Ok(named) => named,
        Err(_) => return Ok(None),
    };
    let mtime = match libc::time_t::try_from(mtime_ns.div_euclid(1_000_000_000)) {
        Ok(tv_sec) => libc::timespec { tv_sec, tv_nsec: mtime_ns.rem_euclid(1_000_000_000) as libc::c_long },
        Err(_) => return Ok(None), // no system takes it: Python names the error
    };
    Ok(Some(Make { path, source, size, digest: digest.to_vec(), sparse, uid, gid, mode, mtime, xattrs }))
}

/// fill(root_fd, groups, own, threads) -> [(group, entry)] of the entries not made, in order.
///
/// `groups`: (pack fd or -1, block offset, block's compressed length, entries); an entry is (path below
/// root_fd, symlink target or None, loose object's path or None, offset of the content in the block, size,
/// BLAKE3 digest (32 bytes), (uid, gid, mode, mtime_ns), xattrs, sparse). Each group's block is read and
/// decompressed once, and its entries made as checkout.make_new does; owner and privileged xattrs only if
/// `own`. `threads` threads take the next group as each is free, all with the GIL released. It never decides
/// anything: an entry it cannot make exactly (an error of any kind, a block or object that cannot be read or
/// does not hash to its digest) leaves nothing of itself and is returned, for Python to make with its error
/// messages.
#[pyfunction]
fn fill(py: Python<'_>, root_fd: i32, groups: &PyList, own: bool, threads: usize) -> PyResult<Vec<(usize, usize)>> {
    let mut work = Vec::with_capacity(groups.len());
    for item in groups.iter() {
        let (pack, offset, clen, entries): (i32, u64, usize, &PyList) = item.extract()?;
        let makes = entries.iter().map(to_make).collect::<PyResult<Vec<_>>>()?;
        work.push(Group { pack, offset, clen, makes });
    }
    let parts = py.allow_threads(|| {
        let start = || (zstd::bulk::Decompressor::new().ok(), Buffers::default(), Vec::new());
        in_threads(threads, work.len(), start, |(z, bufs, left), gi| match z {
            Some(z) => fill_group(root_fd, gi, &work[gi], own, z, bufs, left),
            None => left.extend((0..work[gi].makes.len()).map(|i| (gi, i))), // no zstd context: Python makes them
        })
    });
    let mut failed: Vec<(usize, usize)> = parts
        .ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("fill: a worker thread panicked"))?
        .into_iter()
        .flat_map(|(_, _, left)| left)
        .collect();
    failed.sort_unstable();
    Ok(failed)
}

/// A file or symlink of another tree (or an earlier path of this one) to hardlink into the new tree.
struct Link {
    src_root: libc::c_int,
    src_path: Vec<u8>,
    dst: CString,
    file: bool,
    size: u64,
    uid: u32,
    gid: u32,
    mode: u32,
    mtime_ns: i128,
}

/// The directories of the source trees, opened one component at a time (no symlink followed, no '..') and
/// kept open along the path of the last one, as checkout._SourceDir does: in the manifest's depth-first
/// order each is opened once.
#[derive(Default)]
struct SourceDirs {
    open: std::collections::HashMap<libc::c_int, Vec<(Vec<u8>, libc::c_int)>>,
}

impl SourceDirs {
    fn parent(&mut self, root: libc::c_int, parent: &[u8]) -> Option<libc::c_int> {
        if parent.is_empty() {
            return Some(root);
        }
        let stack = self.open.entry(root).or_default();
        while let Some((path, fd)) = stack.last() {
            if parent == &path[..] || (parent.starts_with(path) && parent.get(path.len()) == Some(&b'/')) {
                break;
            }
            // SAFETY: a descriptor this cache opened and still owns.
            unsafe { libc::close(*fd) };
            stack.pop();
        }
        let (mut path, mut fd) = stack.last().map(|(p, f)| (p.clone(), *f)).unwrap_or((Vec::new(), root));
        if path == parent {
            return Some(fd);
        }
        let rest = if path.is_empty() { parent } else { &parent[path.len() + 1..] };
        for part in rest.split(|&b| b == b'/') {
            if part.is_empty() || part == b"." || part == b".." {
                return None;
            }
            let name = CString::new(part).ok()?;
            let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
            // SAFETY: a valid directory descriptor and NUL-terminated name; the new descriptor is kept in the
            // stack and closed by it.
            let next = unsafe { libc::openat(fd, name.as_ptr(), flags) };
            if next < 0 {
                return None;
            }
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(part);
            stack.push((path.clone(), next));
            fd = next;
        }
        Some(fd)
    }
}

impl Drop for SourceDirs {
    fn drop(&mut self) {
        for stack in self.open.values() {
            for (_, fd) in stack {
                // SAFETY: descriptors this cache opened and owns.
                unsafe { libc::close(*fd) };
            }
        }
    }
}

/// Hardlinks one entry if its source is what the entry describes (as checkout._link checks: type, size,
/// owner where `own`, mode of a regular file, mtime).
fn link_one(root_fd: libc::c_int, l: &Link, dirs: &mut SourceDirs, own: bool) -> bool {
    let (parent, base) = match l.src_path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&l.src_path[..i], &l.src_path[i + 1..]),
        None => (&l.src_path[..0], &l.src_path[..]),
    };
    let (pfd, base) = match (dirs.parent(l.src_root, parent), CString::new(base)) {
        (Some(pfd), Ok(base)) => (pfd, base),
        _ => return false,
    };
    // SAFETY: valid descriptors, NUL-terminated names and an owned stat buffer.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstatat(pfd, base.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) != 0 {
            return false;
        }
        let kind = if l.file { libc::S_IFREG } else { libc::S_IFLNK };
        let same = (st.st_mode & libc::S_IFMT) == kind
            && st.st_size as u64 == l.size
            && (!own || (st.st_uid == l.uid && st.st_gid == l.gid))
            && i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec) == l.mtime_ns
            && (!l.file || st.st_mode & 0o7777 == l.mode);
        same && libc::linkat(pfd, base.as_ptr(), root_fd, l.dst.as_ptr(), 0) == 0
    }
}

/// link_files(root_fd, entries, sources, own, threads) -> indexes of the entries not linked, in order.
///
/// `entries`: manifest.Entry objects of regular files and symlinks; `sources`: for each, (source root fd,
/// path below it). Each entry is hardlinked at its path below root_fd, with the GIL released, by `threads`
/// threads taking the next run of LINK_RUN entries: first those whose source is another tree, then those whose
/// source is in this one (an earlier path of the tree, linked or made before this call). A source that is not
/// what its entry says, and any error (the link limit, EPERM, a name with a NUL byte), leaves that entry for
/// Python: restore makes a new file there.
#[pyfunction]
fn link_files(
    py: Python<'_>, root_fd: i32, entries: &PyList, sources: &PyList, own: bool, threads: usize,
) -> PyResult<Vec<usize>> {
    if entries.len() != sources.len() {
        return Err(pyo3::exceptions::PyValueError::new_err("link_files needs a source for each entry"));
    }
    let mut work = Vec::with_capacity(entries.len());
    for (e, source) in entries.iter().zip(sources.iter()) {
        let (src_root, src_path): (i32, &[u8]) = source.extract()?;
        let file = e.getattr("type")?.extract::<&str>()? == "f";
        let size: u64 = if file { e.getattr("size")?.extract()? } else { e.getattr("target")?.len()? as u64 };
        let (uid, gid, mode, mtime_ns): (u32, u32, u32, i128) = (
            e.getattr("uid")?.extract()?,
            e.getattr("gid")?.extract()?,
            e.getattr("mode")?.extract()?,
            e.getattr("mtime_ns")?.extract()?,
        );
        let dst = CString::new(e.getattr("path")?.extract::<&[u8]>()?).unwrap_or_default(); // "" fails: Python's
        work.push(Link { src_root, src_path: src_path.to_vec(), dst, file, size, uid, gid, mode, mtime_ns });
    }
    let (inside, outside): (Vec<usize>, Vec<usize>) = (0..work.len()).partition(|&i| work[i].src_root == root_fd);
    let mut failed = py.allow_threads(|| -> Option<Vec<usize>> {
        let mut failed = Vec::new();
        for order in [outside, inside] {
            let runs: Vec<&[usize]> = order.chunks(LINK_RUN).collect();
            let parts = in_threads(threads, runs.len(), Vec::new, |left: &mut Vec<usize>, r| {
                let mut dirs = SourceDirs::default();
                left.extend(runs[r].iter().filter(|&&i| !link_one(root_fd, &work[i], &mut dirs, own)));
            })?;
            failed.extend(parts.into_iter().flatten());
        }
        Some(failed)
    })
    .ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("link_files: a worker thread panicked"))?;
    failed.sort_unstable();
    Ok(failed)
}

/// make_dirs(root_fd, paths) -> how many of `paths` (below root_fd, parents first) were made, mode 0700, before
/// the first that could not be: Python makes that one and the rest, and names the error.
#[pyfunction]
fn make_dirs(py: Python<'_>, root_fd: i32, paths: Vec<&[u8]>) -> usize {
    let paths: Vec<Option<CString>> = paths.into_iter().map(|p| CString::new(p).ok()).collect();
    py.allow_threads(|| {
        // SAFETY: mkdirat with a NUL-terminated path that outlives the call.
        let made = |p: &CString| unsafe { libc::mkdirat(root_fd, p.as_ptr(), 0o700) } == 0;
        paths.iter().take_while(|p| p.as_ref().map_or(false, made)).count()
    })
}

const LINK_RUN: usize = 256; // entries a thread of link_files links in a row (one SourceDirs each)

/// Runs jobs 0..jobs in up to `threads` scoped threads, each taking the next job as it is free, with a state
/// of its own made by `start()`; returns each thread's state, or None if a thread panicked.
fn in_threads<S: Send>(
    threads: usize, jobs: usize, start: impl Fn() -> S + Sync, job: impl Fn(&mut S, usize) + Sync,
) -> Option<Vec<S>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.min(jobs).max(1))
            .map(|_| {
                scope.spawn(|| {
                    let mut state = start();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= jobs {
                            return state;
                        }
                        job(&mut state, i);
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().ok()).collect()
    })
}

// -- manifest decoding (manifest.decode) ------------------------------------------------------------------

/// %XX (two upper-case hex digits) to its byte, as manifest.unescape does; anything else is kept.
fn unescape(text: &[u8]) -> Cow<'_, [u8]> {
    if !text.contains(&b'%') {
        return Cow::Borrowed(text); // most names: nothing to copy
    }
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'%' {
            if let (Some(&a), Some(&b)) = (text.get(i + 1), text.get(i + 2)) {
                if let (Some(a), Some(b)) = (hex(a), hex(b)) {
                    out.push(a * 16 + b);
                    i += 3;
                    continue;
                }
            }
        }
        out.push(text[i]);
        i += 1;
    }
    Cow::Owned(out)
}

/// A canonical decimal (an optional '-' for signed, then ASCII digits); None for anything Python's int()
/// might read differently (signs, spaces, underscores) or that does not fit: Python then decodes the line.
fn number(text: &[u8], signed: bool) -> Option<i128> {
    let (neg, digits) = match text.first() {
        Some(b'-') if signed => (true, &text[1..]),
        _ => (false, text),
    };
    if digits.is_empty() || digits.len() > 30 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let v = digits.iter().fold(0i128, |v, d| v * 10 + (d - b'0') as i128);
    Some(if neg { -v } else { v })
}

fn from_hex(text: &[u8]) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    fn digit(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8) // ASCII hex digits of either case only (no sign, no space)
    }
    text.chunks(2).map(|p| Some(digit(p[0])? * 16 + digit(p[1])?)).collect()
}

fn safe_path(path: &[u8]) -> bool {
    path == b"."
        || (!path.is_empty()
            && path[0] != b'/'
            && !path.contains(&0)
            && path.split(|&b| b == b'/').all(|part| !part.is_empty() && part != b"." && part != b".."))
}

/// One decoded line: the fields of Entry, in its __init__'s order (borrowed from the manifest where unescaped).
struct Line<'a> {
    path: Cow<'a, [u8]>,
    kind: u8,
    mode: i128,
    uid: i128,
    gid: i128,
    mtime: i128,
    size: i128,
    digest: Option<&'a str>,
    target: Cow<'a, [u8]>,
    rdev: (i128, i128),
    xattrs: Vec<(Cow<'a, [u8]>, Vec<u8>)>,
    sparse: bool,
}

fn decode_line(line: &[u8]) -> Option<Line<'_>> {
    let mut fields: [&[u8]; 9] = [&[]; 9];
    let mut parts = line.split(|&b| b == b'\t');
    for field in fields.iter_mut() {
        *field = parts.next()?;
    }
    if parts.next().is_some() || fields[1].len() != 1 || !b"fdlhcbp".contains(&fields[1][0]) {
        return None;
    }
    let kind = fields[1][0];
    let mode = if !fields[2].is_empty() && fields[2].len() <= 5 && fields[2].iter().all(|b| (b'0'..=b'7').contains(b)) {
        fields[2].iter().fold(0i128, |v, d| v * 8 + (d - b'0') as i128)
    } else {
        return None;
    };
    let (uid, gid, mtime, size) =
        (number(fields[3], false)?, number(fields[4], false)?, number(fields[5], true)?, number(fields[6], false)?);
    if mode & !0o7777 != 0 {
        return None;
    }
    let data = fields[7];
    let (mut digest, mut target, mut rdev, mut sparse) = (None, Cow::Borrowed(&b""[..]), (0, 0), false);
    match kind {
        b'f' => {
            let (hexd, flag) = match data.iter().position(|&b| b == b',') {
                Some(i) => (&data[..i], &data[i + 1..]),
                None => (data, &data[..0]),
            };
            if hexd.len() != 64 || !hexd.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)) {
                return None;
            }
            digest = Some(std::str::from_utf8(hexd).ok()?);
            sparse = flag == b"sparse";
        }
        b'l' | b'h' => target = unescape(data),
        b'c' | b'b' => {
            let parts: Vec<&[u8]> = data.split(|&b| b == b',').collect();
            if parts.len() != 2 {
                return None;
            }
            rdev = (number(parts[0], true)?, number(parts[1], true)?);
        }
        _ => {}
    }
    let mut xattrs = Vec::new();
    if fields[8] != b"-" {
        for item in fields[8].split(|&b| b == b',') {
            let kv: Vec<&[u8]> = item.split(|&b| b == b'=').collect();
            if kv.len() != 2 {
                return None;
            }
            xattrs.push((unescape(kv[0]), from_hex(kv[1])?));
        }
    }
    Some(Line { path: unescape(fields[0]), kind, mode, uid, gid, mtime, size, digest, target, rdev, xattrs, sparse })
}

/// Every line decoded and the whole checked as manifest.decode checks it, or None at the first thing that is
/// not exactly canonical and valid (Python then decodes it, and names what is wrong).
fn decode_all(data: &[u8]) -> Option<Vec<Line<'_>>> {
    let mut kinds: std::collections::HashMap<Cow<'_, [u8]>, u8> = std::collections::HashMap::new();
    let mut open_dirs: Vec<Cow<'_, [u8]>> = Vec::new();
    let mut out = Vec::new();
    for line in data.split(|&b| b == b'\n') {
        if line.is_empty() {
            continue;
        }
        let e = decode_line(line)?;
        if !safe_path(&e.path) || kinds.contains_key(&e.path) {
            return None;
        }
        if &e.path[..] != b"." {
            let parent = match e.path.iter().rposition(|&b| b == b'/') {
                Some(i) => &e.path[..i],
                None => &b"."[..],
            };
            if kinds.get(parent) != Some(&b'd') {
                return None;
            }
            while open_dirs.last().map_or(false, |d| &d[..] != parent) {
                open_dirs.pop();
            }
            if open_dirs.is_empty() {
                return None;
            }
        } else if e.kind != b'd' {
            return None;
        }
        if e.kind == b'd' {
            open_dirs.push(e.path.clone());
        }
        if e.kind == b'h' && (!safe_path(&e.target) || kinds.get(&e.target) != Some(&b'f')) {
            return None;
        }
        kinds.insert(e.path.clone(), e.kind);
        out.push(e);
    }
    if out.first().map(|e| &e.path[..]) != Some(&b"."[..]) {
        return None;
    }
    Some(out)
}

/// decode_manifest(body, Entry) -> [Entry] or None: the lines after the header, decoded and checked exactly
/// as manifest.decode does (the same entries), with the GIL released while parsing; None where anything is
/// not canonical or not valid, for manifest.decode to decode and name.
#[pyfunction]
fn decode_manifest(py: Python<'_>, body: &[u8], entry: &PyAny) -> PyResult<PyObject> {
    let lines = match py.allow_threads(|| decode_all(body)) {
        Some(lines) => lines,
        None => return Ok(py.None()),
    };
    let list = PyList::empty(py);
    let empty = PyBytes::new(py, b"");
    let empty_str = pyo3::types::PyString::new(py, "");
    let mut kinds: std::collections::HashMap<u8, PyObject> = std::collections::HashMap::new();
    let no_rdev = (0, 0).to_object(py);
    let no_xattrs = pyo3::types::PyTuple::empty(py).to_object(py);
    for e in lines {
        let kind = kinds
            .entry(e.kind)
            .or_insert_with(|| pyo3::types::PyString::new(py, std::str::from_utf8(&[e.kind]).unwrap_or("?")).into())
            .clone_ref(py);
        let digest: PyObject = match &e.digest {
            Some(d) => pyo3::types::PyString::new(py, d).into(),
            None => empty_str.into(),
        };
        let target: PyObject = if e.target.is_empty() { empty.into() } else { PyBytes::new(py, &e.target).into() };
        let xattrs = pyo3::types::PyTuple::new(
            py,
            e.xattrs.iter().map(|(k, v)| (PyBytes::new(py, k), PyBytes::new(py, v)).to_object(py)),
        );
        let args = pyo3::types::PyTuple::new(
            py,
            [
                PyBytes::new(py, &e.path).to_object(py),
                kind,
                int(py, e.mode),
                int(py, e.uid),
                int(py, e.gid),
                int(py, e.mtime),
                int(py, e.size),
                digest,
                target,
                if e.rdev == (0, 0) { no_rdev.clone_ref(py) } else { (int(py, e.rdev.0), int(py, e.rdev.1)).to_object(py) },
                if e.xattrs.is_empty() { no_xattrs.clone_ref(py) } else { xattrs.to_object(py) },
                e.sparse.to_object(py),
            ],
        );
        list.append(entry.call1(args)?)?;
    }
    Ok(list.into())
}

/// A Python int of `v`: through a C long where it fits (pyo3 converts an i128 through a byte array, 3 x slower).
fn int(py: Python<'_>, v: i128) -> PyObject {
    match i64::try_from(v) {
        Ok(small) => small.to_object(py),
        Err(_) => v.to_object(py),
    }
}

// -- pack indexes (objects.PackIndex) -----------------------------------------------------------------------

/// add_index_records(records, blocks, index_offset, pack_no, slots) -> whether all were valid.
///
/// `records`: whole records of a pack's index ("<32sQIIQ" each, or format 1's "<32sQIQ" unless `blocks`).
/// Each is checked as objects._records and PackIndex.pack_value check it (its block before the index, the
/// object inside a block, every field in range); if all are valid, each digest not in `slots` yet is set to
/// PackIndex.pack_value(pack_no, ...), and True is returned; otherwise nothing is added and False returned.
#[pyfunction]
fn add_index_records(
    py: Python<'_>, records: &[u8], blocks: bool, index_offset: u64, pack_no: u64, slots: &pyo3::types::PyDict,
) -> PyResult<bool> {
    const SIZE_MAX: u64 = (1 << 40) - 1;
    const OFFSET_MAX: u64 = (1 << 40) - 1;
    let rec = if blocks { 56 } else { 52 };
    if records.len() % rec != 0 {
        return Ok(false);
    }
    let u64_at = |r: &[u8], i: usize| u64::from_le_bytes(r[i..i + 8].try_into().unwrap_or([0; 8]));
    let u32_at = |r: &[u8], i: usize| u32::from_le_bytes(r[i..i + 4].try_into().unwrap_or([0; 4])) as u64;
    let fields = |r: &[u8]| -> (u64, u64, u64, u64) {
        if blocks {
            (u64_at(r, 32), u32_at(r, 40), u32_at(r, 44), u64_at(r, 48))
        } else {
            (u64_at(r, 32), u32_at(r, 40), 0, u64_at(r, 44))
        }
    };
    let valid = records.chunks_exact(rec).all(|r| {
        let (offset, clen, inner, size) = fields(r);
        offset.checked_add(clen).map_or(false, |end| end <= index_offset)
            && inner + size.min(u64::MAX - inner) <= MAX_BLOCK as u64
            && size <= SIZE_MAX
            && offset <= OFFSET_MAX
    });
    if !valid {
        return Ok(false);
    }
    for r in records.chunks_exact(rec) {
        let digest = PyBytes::new(py, &r[..32]);
        if slots.contains(digest)? {
            continue;
        }
        let (offset, clen, inner, size) = fields(r);
        // pack_value: pack_no << 144 | offset << 104 | clen << 72 | inner << 40 | size, little-endian, 256 bits.
        let low = size as u128 | (inner as u128) << 40 | (clen as u128) << 72 | (offset as u128) << 104;
        let high = (offset >> 24) as u128 | (pack_no as u128) << 16;
        let mut value = [0u8; 32];
        value[..16].copy_from_slice(&low.to_le_bytes());
        value[16..].copy_from_slice(&high.to_le_bytes());
        // SAFETY: a valid buffer of its length; the new reference is owned by the PyObject.
        let int = unsafe {
            PyObject::from_owned_ptr_or_err(py, pyo3::ffi::_PyLong_FromByteArray(value.as_ptr(), value.len(), 1, 0))?
        };
        slots.set_item(digest, int)?;
    }
    Ok(true)
}

// -- materialize's keys (materialize.mat_key) ---------------------------------------------------------------

/// mat_keys(entries) -> [key or None]: materialize.mat_key of each regular file and symlink (64 hex digits),
/// None for the other entries; raises if an entry does not have the attributes of a manifest.Entry.
#[pyfunction]
fn mat_keys(py: Python<'_>, entries: &PyList) -> PyResult<Vec<Option<PyObject>>> {
    use std::io::Write;
    let mut out = Vec::with_capacity(entries.len());
    let mut text = Vec::with_capacity(64);
    for e in entries.iter() {
        let attr = |name: &pyo3::types::PyString| e.getattr(name);
        let kind: &str = attr(pyo3::intern!(py, "type"))?.extract()?;
        let mut h = blake3::Hasher::new();
        match kind {
            "f" => {
                let digest: &str = attr(pyo3::intern!(py, "digest"))?.extract()?;
                h.update(digest.as_bytes());
            }
            "l" => {
                let target: &[u8] = attr(pyo3::intern!(py, "target"))?.extract()?;
                h.update(b"symlink\0");
                h.update(target);
            }
            _ => {
                out.push(None);
                continue;
            }
        }
        let (uid, gid, mode, mtime) = (
            whole(attr(pyo3::intern!(py, "uid"))?)?,
            whole(attr(pyo3::intern!(py, "gid"))?)?,
            whole(attr(pyo3::intern!(py, "mode"))?)?,
            whole(attr(pyo3::intern!(py, "mtime_ns"))?)?,
        );
        let sparse: bool = attr(pyo3::intern!(py, "sparse"))?.extract()?;
        text.clear();
        let sign = if mode < 0 { "-" } else { "" };
        // Writing into a Vec cannot fail.
        let _ = write!(text, "{} {} {}{:o} {} {}", uid, gid, sign, mode.unsigned_abs(), mtime, sparse as u8);
        h.update(&text);
        let xattrs = attr(pyo3::intern!(py, "xattrs"))?;
        if xattrs.len()? > 0 {
            let xattrs: Vec<(&[u8], &[u8])> = xattrs.extract()?;
            for (k, v) in xattrs {
                h.update(b"\0");
                h.update(k);
                h.update(b"\0");
                h.update(v);
            }
        }
        out.push(Some(pyo3::types::PyString::new(py, h.finalize().to_hex().as_str()).into()));
    }
    Ok(out)
}

/// A Python int as an i128: through a C long where it fits (pyo3 reads an i128 through a byte array).
fn whole(v: &PyAny) -> PyResult<i128> {
    match v.extract::<i64>() {
        Ok(small) => Ok(small as i128),
        Err(_) => v.extract(),
    }
}

#[pymodule]
fn _native(_py: Python<'_>, m: &PyModule) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(read_files, m)?)?;
    m.add_function(wrap_pyfunction!(fill, m)?)?;
    m.add_function(wrap_pyfunction!(link_files, m)?)?;
    m.add_function(wrap_pyfunction!(make_dirs, m)?)?;
    m.add_function(wrap_pyfunction!(decode_manifest, m)?)?;
    m.add_function(wrap_pyfunction!(add_index_records, m)?)?;
    m.add_function(wrap_pyfunction!(mat_keys, m)?)?;
    m.add_function(wrap_pyfunction!(walk::walk_tree, m)?)?;
    m.add_function(wrap_pyfunction!(walk::exclude_matches, m)?)?;
    m.add_class::<walk::Walker>()?;
    m.add_class::<walk::Run>()?;
    m.add_class::<walk::Stat>()?;
    Ok(())
}
