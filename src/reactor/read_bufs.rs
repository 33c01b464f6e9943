//! Read buffers for callers that read their own responses
//! (`ConnShared::read_responses`), shared by every thread of the process.
//!
//! A caller that spins for its response reads the socket into a buffer of
//! [`READ_BUF_LEN`] bytes, lent to the connection's decoder for the read and
//! taken back once its bytes are decoded. Only spinning callers read, and
//! only a few spin at once (`max_spinning`: one core fewer than the process
//! may use), so the process keeps that many buffers: a caller borrows one
//! for its spin ([`ReadBufs::lend`]) and gives it back when the spin ends.
//!
//! Why not one buffer per thread: a synchronous service runs many more
//! threads than it has cores, and each thread that had spun once kept its
//! 16 KiB until it exited (200 caller threads: 3.2 MiB; here at most one
//! buffer per core).

use parking_lot::Mutex;

/// Size of a caller's read buffer: a few hundred small responses per read.
/// A larger response is read into its own buffer all the same (see
/// `FrameDecoder`).
pub(crate) const READ_BUF_LEN: usize = 16 * 1024;

/// Spare read buffers, at most `keep` of them.
pub(crate) struct ReadBufs {
    spare: Mutex<Vec<Vec<u8>>>,
    /// How many buffers the spares hold at most.
    keep: usize,
}

impl ReadBufs {
    /// No spares yet; at most `keep` are kept once given back.
    pub(crate) fn new(keep: usize) -> ReadBufs {
        ReadBufs {
            spare: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// A loan for one spin, holding no buffer until the first read asks for
    /// one: a caller that never gets to read (the loop reads meanwhile)
    /// never touches the spares.
    pub(crate) fn lend(&self) -> Lent<'_> {
        Lent {
            bufs: self,
            buf: None,
        }
    }

    /// How many spare buffers are kept right now.
    #[cfg(test)]
    fn spares(&self) -> usize {
        self.spare.lock().len()
    }
}

/// A read buffer on loan to one spinning caller; given back to the spares
/// (unless `keep` are there already) when dropped.
pub(crate) struct Lent<'a> {
    bufs: &'a ReadBufs,
    buf: Option<Vec<u8>>,
}

impl Lent<'_> {
    /// The buffer for the next read: the one this loan holds, else a spare,
    /// else a new one.
    pub(crate) fn take(&mut self) -> Vec<u8> {
        self.buf
            .take()
            .or_else(|| self.bufs.spare.lock().pop())
            .unwrap_or_else(|| vec![0; READ_BUF_LEN])
    }

    /// Takes back the buffer a read used (the decoder gives it back once
    /// its bytes are decoded; one it keeps for an unfinished frame is not
    /// the loan's any more).
    pub(crate) fn put(&mut self, buf: Vec<u8>) {
        self.buf = Some(buf);
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            let mut spare = self.bufs.spare.lock();
            if spare.len() < self.bufs.keep {
                spare.push(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spins one after another, on as many threads, share one buffer: each
    /// later loan gets the first one's buffer back (marked, where a new
    /// buffer would be zeroed).
    #[test]
    fn loans_one_after_another_share_one_buffer() {
        let bufs = ReadBufs::new(2);
        for spin in 0..16u8 {
            std::thread::scope(|s| {
                s.spawn(|| {
                    let mut lent = bufs.lend();
                    let mut buf = lent.take();
                    assert_eq!(buf.len(), READ_BUF_LEN);
                    if spin > 0 {
                        assert_eq!(buf[0], spin - 1, "the buffer the last spin gave back");
                    }
                    buf[0] = spin;
                    lent.put(buf);
                });
            });
        }
        assert_eq!(bufs.spares(), 1);
    }

    /// More loans at once than `keep`: each gets a buffer, and only `keep`
    /// of them stay once all are given back.
    #[test]
    fn no_more_than_keep_buffers_stay() {
        let bufs = ReadBufs::new(2);
        let mut loans: Vec<Lent<'_>> = (0..5).map(|_| bufs.lend()).collect();
        let mut seen = std::collections::HashSet::new();
        for lent in &mut loans {
            let buf = lent.take();
            assert!(seen.insert(buf.as_ptr() as usize), "each loan has its own");
            lent.put(buf);
        }
        drop(loans);
        assert_eq!(bufs.spares(), 2);
    }

    /// A loan that never read, or whose buffer the decoder kept, gives
    /// nothing back.
    #[test]
    fn a_loan_without_its_buffer_gives_nothing_back() {
        let bufs = ReadBufs::new(2);
        drop(bufs.lend());
        let mut lent = bufs.lend();
        let kept_by_the_decoder = lent.take();
        drop(lent);
        assert_eq!(bufs.spares(), 0);
        drop(kept_by_the_decoder);
    }
}
