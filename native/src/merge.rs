//! The stat cache read alongside commit's walk (imgstore/statcache.py, docs/format.md "Stat cache"), in the
//! walk's thread: each walked entry is looked up in the old cache as StatCache.lookup does, and entries found as
//! they were are handed to Python in runs (their manifest lines and cache records joined), so that an unchanged
//! entry costs Python nothing of its own ("Commit's walk and stat cache merge, sessions 18-19" in
//! docs/benchmarks.md).

use std::fs::File;
use std::io::Read;

const MAGIC: &[u8] = b"imgstore-statcache 6\n";
pub const KEY_LEN: usize = 53; // statcache.KEY
const NEVER: [u8; KEY_LEN] = [0xff; KEY_LEN];
const MAX_BLOCK: u64 = 1 << 28; // far above the 1 MiB blocks statcache writes: more is damage

/// A record of the old cache, as the file has it: path and line lengths (u32 LE), path, key, line.
#[derive(Clone, Default)]
pub struct Row {
    pub record: Vec<u8>,
    plen: usize,
}

impl Row {
    pub fn path(&self) -> &[u8] {
        &self.record[8..8 + self.plen]
    }

    pub fn key(&self) -> &[u8] {
        &self.record[8 + self.plen..8 + self.plen + KEY_LEN]
    }

    pub fn line(&self) -> &[u8] {
        &self.record[8 + self.plen + KEY_LEN..]
    }

    /// The row of the record at the start of `records` and the record's length (records joined, as a run
    /// holds them: they were checked when read).
    pub fn parse(records: &[u8]) -> (Row, usize) {
        let plen = u32::from_le_bytes([records[0], records[1], records[2], records[3]]) as usize;
        let llen = u32::from_le_bytes([records[4], records[5], records[6], records[7]]) as usize;
        let end = 8 + plen + KEY_LEN + llen;
        (Row { record: records[..end].to_vec(), plen }, end)
    }

    /// The raw content digest a file's line names (statcache.file_digest); None for any other line.
    pub fn file_digest(&self) -> Option<[u8; 32]> {
        let line = self.line();
        let mut fields = line.split(|&b| b == b'\t');
        if fields.nth(1)? != b"f" {
            return None;
        }
        let mut back = line.strip_suffix(b"\n")?.rsplit(|&b| b == b'\t');
        back.next()?; // xattrs
        let hex = back.next()?.get(..64)?;
        let mut out = [0u8; 32];
        for (i, pair) in hex.chunks(2).enumerate() {
            let digit = |c: u8| (c as char).to_digit(16);
            out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
        }
        Some(out)
    }
}

/// Manifest order (manifest.sort_key): component by component, which is byte order with '/' below every byte a
/// name can hold; the root "." first.
fn before(a: &[u8], b: &[u8]) -> bool {
    if b == b"." {
        return false;
    }
    if a == b"." {
        return true;
    }
    let map = |c: &u8| if *c == b'/' { 0u8 } else { *c };
    a.iter().map(map).lt(b.iter().map(map))
}

struct Reader {
    f: File,
    block: Vec<u8>,
    pos: usize,
}

impl Reader {
    /// The next block; Ok(false) at the end of the file, Err on any damage.
    fn next_block(&mut self) -> Result<bool, ()> {
        let mut head = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match self.f.read(&mut head[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(()),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Err(()),
            }
        }
        // Read up to the length the block claims, never allocating more than the file holds (a damaged length).
        let n = u32::from_le_bytes(head) as usize;
        let mut frame = Vec::new();
        (&mut self.f).take(n as u64).read_to_end(&mut frame).map_err(|_| ())?;
        if frame.len() != n {
            return Err(());
        }
        // Each block is one frame with a checksum, which libzstd checks.
        self.block = match zstd::zstd_safe::get_frame_content_size(&frame) {
            Ok(Some(size)) if size <= MAX_BLOCK => {
                let out = zstd::bulk::decompress(&frame, size as usize).map_err(|_| ())?;
                if out.len() as u64 != size {
                    return Err(());
                }
                out
            }
            Ok(None) => zstd::stream::decode_all(&frame[..]).map_err(|_| ())?,
            _ => return Err(()),
        };
        self.pos = 0;
        Ok(true)
    }

    fn take(&mut self, n: usize) -> Result<&[u8], ()> {
        let end = self.pos.checked_add(n).ok_or(())?;
        let got = self.block.get(self.pos..end).ok_or(())?;
        self.pos = end;
        Ok(got)
    }

    fn u32(&mut self) -> Result<usize, ()> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    /// The next record into `row` (its buffer reused); Ok(false) at the end.
    fn next_row(&mut self, row: &mut Row) -> Result<bool, ()> {
        while self.pos >= self.block.len() {
            if !self.next_block()? {
                return Ok(false);
            }
        }
        let start = self.pos;
        let (plen, llen) = (self.u32()?, self.u32()?);
        let len = plen.checked_add(llen).and_then(|n| n.checked_add(KEY_LEN)).ok_or(())?;
        self.take(len)?;
        row.record.clear();
        row.record.extend_from_slice(&self.block[start..self.pos]);
        row.plen = plen;
        Ok(true)
    }
}

/// The old cache as the walk consumes it: the row at the cursor, and the first entry from which the next cache
/// must be written rather than copied (statcache's _first_miss).
pub struct Merge {
    reader: Option<Reader>,
    cur: Row,
    has_cur: bool,
    found: Row, // the row the last lookup found (its buffer and cur's swap: no allocation per row)
    trusted_before: i128,
    pub first_miss: Option<usize>,
}

impl Merge {
    /// The cache at `path` if it is of this format and of the tree at `root`; a missing or damaged one is
    /// empty (every entry a miss). Entries whose ctime is less than `margin_ns` older than its scan are not
    /// trusted.
    pub fn open(path: &[u8], root: &[u8], margin_ns: i128) -> Merge {
        let mut merge = Merge {
            reader: None,
            cur: Row::default(),
            has_cur: false,
            found: Row::default(),
            trusted_before: 0,
            first_miss: None,
        };
        let header = || -> Result<(Reader, i64), ()> {
            use std::os::unix::ffi::OsStrExt;
            let mut f = File::open(std::ffi::OsStr::from_bytes(path)).map_err(|_| ())?;
            let mut magic = vec![0u8; MAGIC.len()];
            f.read_exact(&mut magic).map_err(|_| ())?;
            if magic != MAGIC {
                return Err(());
            }
            let mut r = Reader { f, block: Vec::new(), pos: 0 };
            if !r.next_block()? {
                return Err(());
            }
            let n = r.u32()?;
            if r.take(n)? != root {
                return Err(());
            }
            let started = r.take(8)?;
            let started = i64::from_le_bytes(started.try_into().map_err(|_| ())?);
            Ok((r, started))
        };
        if let Ok((reader, started)) = header() {
            merge.trusted_before = i128::from(started) - margin_ns;
            merge.reader = Some(reader);
            merge.advance(0);
        }
        merge
    }

    fn missed(&mut self, at: usize) {
        if self.first_miss.is_none() {
            self.first_miss = Some(at);
        }
    }

    /// Moves the cursor to the next row; a damaged tail ends the cache there (what follows is examined anew).
    fn advance(&mut self, at: usize) {
        self.has_cur = match self.reader.as_mut().map(|r| r.next_row(&mut self.cur)) {
            Some(Ok(more)) => more,
            Some(Err(())) => {
                self.reader = None;
                self.missed(at);
                false
            }
            None => false,
        };
    }

    /// StatCache.lookup of entry number `at`: whether the entry is as its row (found()) recorded it (`key`: its
    /// lstat fields packed as statcache.key, None where a time does not fit); false is a miss.
    pub fn lookup(&mut self, at: usize, rel: &[u8], key: Option<&[u8]>, ctime_ns: i128) -> bool {
        let mut found = false;
        while self.has_cur {
            if self.cur.path() == rel {
                std::mem::swap(&mut self.cur, &mut self.found);
                found = true;
                self.advance(at);
                break;
            }
            if before(rel, self.cur.path()) {
                break; // rel is new
            }
            self.missed(at); // an old path that is gone
            self.advance(at);
        }
        let hit = match key {
            Some(key) => found && ctime_ns < self.trusted_before && self.found.key() == key && key != NEVER,
            None => false,
        };
        if !hit {
            self.missed(at);
        }
        hit
    }

    /// The row the last lookup found.
    pub fn found(&self) -> &Row {
        &self.found
    }

    /// After the last entry (`entries` of them): rows left are entries removed at the end of the tree.
    pub fn finish(&mut self, entries: usize) {
        if self.has_cur {
            self.missed(entries);
        }
    }
}
