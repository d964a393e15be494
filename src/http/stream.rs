//! The live change log as Server-Sent Events, for any number of viewers at
//! no cost to the pipeline.
//!
//! One task, the [`Fanout`], reads new changes from the log a batch at a
//! time and writes each as an SSE frame once, into one buffer per batch;
//! every live stream gets the batch by reference (a `broadcast` channel of
//! `Arc`s). A stream without a filter sends a batch as one chunk, however
//! many changes it holds; a filtered one sends the frames it keeps, still
//! without copying them. The fanout waits [`TICK`] after an append before
//! it reads, so that a burst of writes is one batch for the viewers rather
//! than thousands of wake-ups competing with the pipeline, and it
//! serialises nothing while no stream is waiting for a batch (none is open,
//! or every one is busy or stalled): it holds its batch until one is.
//!
//! A stream that is not read (a stalled client) is not polled, so it costs
//! nothing: the channel overwrites what it did not take. When it reads
//! again it catches up from the log itself, and if its next change is no
//! longer retained it gets a `lagged` event and the stream closes. A stream
//! also reads from the log for what came before it joined (`?after=`,
//! `Last-Event-ID`) and for anything the fanout skipped while it had no
//! viewers, so it never misses a change.

use std::convert::Infallible;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use futures_util::stream::{self, Stream};
use serde_json::json;
use tokio::sync::Notify;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;

use crate::engine::log::{Change, ChangeLog, Gone};

/// How long the fanout gathers appends into one batch.
pub const TICK: Duration = Duration::from_millis(50);

/// Changes per batch at most.
const BATCH: usize = 1024;

/// Batches the channel holds for streams that are behind; a stream further
/// behind reads from the log.
const CHANNEL: usize = 64;

/// Changes a stream reads from the log at a time.
const LOG_PAGE: usize = 256;

/// How often an idle stream sends a comment, so that proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Consecutive changes as SSE frames, serialised once for every stream.
struct Batch {
    /// The sequence this batch follows on from.
    after: u64,
    /// The last sequence in it.
    last: u64,
    /// Every frame, back to back.
    bytes: Bytes,
    /// Each change, with its frame (a slice of `bytes`).
    frames: Vec<(Arc<Change>, Bytes)>,
}

/// The one reader of new changes for every live stream.
pub struct Fanout {
    sender: broadcast::Sender<Arc<Batch>>,
    /// Streams waiting for the next batch now.
    waiting: Arc<Waiters>,
}

impl Fanout {
    /// Starts the fanout task on the current runtime; it ends with `stopping`.
    pub fn start(log: Arc<ChangeLog>, stopping: CancellationToken) -> Arc<Self> {
        let (sender, _) = broadcast::channel(CHANNEL);
        let waiting = Arc::new(Waiters::default());
        let fanout = Arc::new(Self {
            sender: sender.clone(),
            waiting: waiting.clone(),
        });
        tokio::spawn(publish(log, sender, waiting, stopping));
        fanout
    }

    /// A live stream of `log` after `cursor`, of the changes `keep` keeps.
    pub fn stream(
        &self,
        log: Arc<ChangeLog>,
        cursor: u64,
        keep: impl Fn(&Change) -> bool + Send + 'static,
    ) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
        // Subscribed before the log is read, so nothing published after the
        // read can be missed.
        let live = self.sender.subscribe();
        let mut keepalive = tokio::time::interval(KEEP_ALIVE);
        // After a stall, one comment, not one per interval missed.
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        keepalive.reset();
        let viewer = Viewer {
            log,
            cursor,
            keep: Box::new(keep),
            live,
            keepalive,
            catching_up: true,
            waiting: self.waiting.clone(),
        };
        stream::unfold(Some(viewer), |viewer| async move {
            let mut viewer = viewer?;
            match viewer.next().await {
                Next::Send(bytes) => Some((Ok(bytes), Some(viewer))),
                Next::Last(bytes) => Some((Ok(bytes), None)),
                Next::End => None,
            }
        })
    }
}

/// Reads new changes a batch at a time and publishes them, serialised,
/// while any stream is open; while none is, it does not even watch the log
/// (so appends do not pay for waking it).
async fn publish(
    log: Arc<ChangeLog>,
    sender: broadcast::Sender<Arc<Batch>>,
    waiting: Arc<Waiters>,
    stopping: CancellationToken,
) {
    loop {
        if sender.receiver_count() == 0 {
            // Woken by the first stream to wait for a batch (`notify_one`
            // keeps the wake-up if that is before this wait).
            tokio::select! {
                () = stopping.cancelled() => return,
                () = waiting.ready.notified() => continue,
            }
        }
        // Watching from here on; a stream reads from the log whatever came
        // before (a batch that starts after its cursor sends it there).
        let mut appended = log.watch();
        let mut cursor = log.latest();
        // A stream that joined behind this point (it read the log before
        // changes it has not seen were appended) learns of them now rather
        // than at the next append: a batch that starts after its cursor
        // sends it to the log.
        let _ = sender.send(Arc::new(Batch::of(cursor, Vec::new())));
        while sender.receiver_count() > 0 {
            tokio::select! {
                () = stopping.cancelled() => return,
                changed = appended.changed() => if changed.is_err() { return },
            }
            // Let a burst gather: one batch for many appends.
            tokio::select! {
                () = stopping.cancelled() => return,
                () = tokio::time::sleep(TICK) => {}
            }
            appended.borrow_and_update();
            // While every stream is busy sending or stalled, none would take
            // a batch: hold it until one waits (or all are gone).
            while waiting.count.load(Ordering::Acquire) == 0 && sender.receiver_count() > 0 {
                tokio::select! {
                    () = stopping.cancelled() => return,
                    () = waiting.ready.notified() => {}
                    // The last stream may have gone without a wake-up.
                    () = tokio::time::sleep(TICK) => {}
                }
            }
            cursor = publish_from(&log, &sender, cursor);
        }
    }
}

/// Publishes every change after `cursor`; the new cursor.
fn publish_from(log: &ChangeLog, sender: &broadcast::Sender<Arc<Batch>>, mut cursor: u64) -> u64 {
    while sender.receiver_count() > 0 {
        let page = match log.read_strict(cursor, BATCH, |_| true) {
            Ok(page) => page,
            // Trimmed before it was read: streams that need it get `lagged`
            // when they look for it in the log.
            Err(gone) => {
                cursor = gone.oldest.saturating_sub(1);
                continue;
            }
        };
        if page.events.is_empty() {
            break;
        }
        let batch = Batch::of(cursor, page.events);
        cursor = batch.last;
        // An error only means the last receiver left just now.
        let _ = sender.send(Arc::new(batch));
    }
    cursor
}

impl Batch {
    fn of(after: u64, changes: Vec<Arc<Change>>) -> Self {
        let mut buffer = Vec::with_capacity(changes.len() * 512);
        let mut ends = Vec::with_capacity(changes.len());
        for change in &changes {
            write_frame(&mut buffer, change);
            ends.push(buffer.len());
        }
        let bytes = Bytes::from(buffer);
        let mut start = 0;
        let frames = changes
            .into_iter()
            .zip(ends)
            .map(|(change, end)| {
                let frame = bytes.slice(start..end);
                start = end;
                (change, frame)
            })
            .collect::<Vec<_>>();
        Self {
            after,
            last: frames.last().map_or(after, |(c, _)| c.seq),
            bytes,
            frames,
        }
    }
}

/// One change as an SSE frame: `id:` its sequence, `data:` its CloudEvent.
fn write_frame(buffer: &mut Vec<u8>, change: &Change) {
    let _ = write!(buffer, "id: {}\ndata: ", change.seq);
    // A change serialises to JSON without fail, and compact JSON has no
    // newline to break the frame.
    let _ = serde_json::to_writer(&mut *buffer, change);
    buffer.extend_from_slice(b"\n\n");
}

/// The `lagged` event that closes a stream that fell behind the log.
fn lagged(gone: Gone) -> Bytes {
    let data = json!({
        "detail": "this stream fell behind the retained log and is closed; resume from `oldest` or later",
        "after": gone.after,
        "oldest": gone.oldest,
    });
    Bytes::from(format!("event: lagged\ndata: {data}\n\n"))
}

enum Next {
    Send(Bytes),
    /// Send this, then end.
    Last(Bytes),
    End,
}

/// How many streams wait for a batch now, and a wake-up for the fanout
/// when one starts to.
#[derive(Default)]
struct Waiters {
    count: AtomicUsize,
    ready: Notify,
}

/// Counts a stream as waiting for a batch while it lives.
struct Waiting(Arc<Waiters>);

impl Waiting {
    fn start(waiters: &Arc<Waiters>) -> Self {
        waiters.count.fetch_add(1, Ordering::AcqRel);
        // A stored wake-up if the fanout is not waiting yet.
        waiters.ready.notify_one();
        Self(waiters.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One live stream's place in the log.
struct Viewer {
    log: Arc<ChangeLog>,
    /// The last sequence sent (or skipped by the filter).
    cursor: u64,
    keep: Box<dyn Fn(&Change) -> bool + Send>,
    live: broadcast::Receiver<Arc<Batch>>,
    keepalive: tokio::time::Interval,
    /// Reading from the log, until it has nothing more.
    catching_up: bool,
    /// The fanout's count of streams waiting for a batch.
    waiting: Arc<Waiters>,
}

impl Viewer {
    async fn next(&mut self) -> Next {
        loop {
            if self.catching_up {
                match self.read_log() {
                    Err(gone) => return Next::Last(lagged(gone)),
                    Ok(Some(bytes)) => return Next::Send(bytes),
                    Ok(None) => self.catching_up = false,
                }
            }
            let waiting = Waiting::start(&self.waiting);
            let batch = tokio::select! {
                received = self.live.recv() => received,
                _ = self.keepalive.tick() => return Next::Send(Bytes::from_static(b":keep-alive\n\n")),
            };
            drop(waiting);
            match batch {
                Ok(batch) if batch.last <= self.cursor => {}
                // Changes came before the fanout started watching, or this
                // stream has not read up to where the batch starts.
                Ok(batch) if batch.after > self.cursor => self.catching_up = true,
                Ok(batch) => {
                    if let Some(bytes) = self.take_batch(&batch) {
                        self.keepalive.reset();
                        return Next::Send(bytes);
                    }
                }
                Err(RecvError::Lagged(_)) => self.catching_up = true,
                Err(RecvError::Closed) => return Next::End,
            }
        }
    }

    /// The next page of kept changes from the log, serialised for this
    /// stream; `None` once it has read all there is.
    fn read_log(&mut self) -> Result<Option<Bytes>, Gone> {
        loop {
            let page = self
                .log
                .read_strict(self.cursor, LOG_PAGE, |c| (self.keep)(c))?;
            if page.next == self.cursor {
                return Ok(None);
            }
            self.cursor = page.next;
            if !page.events.is_empty() {
                let mut buffer = Vec::with_capacity(page.events.len() * 512);
                for change in &page.events {
                    write_frame(&mut buffer, change);
                }
                self.keepalive.reset();
                return Ok(Some(Bytes::from(buffer)));
            }
        }
    }

    /// What this stream keeps of `batch` after its cursor (which the batch
    /// covers), without copying when it keeps it all.
    fn take_batch(&mut self, batch: &Batch) -> Option<Bytes> {
        let start = batch.frames.partition_point(|(c, _)| c.seq <= self.cursor);
        self.cursor = batch.last;
        let frames = &batch.frames[start..];
        if frames.iter().all(|(c, _)| (self.keep)(c)) {
            let offset = batch.bytes.len() - frames.iter().map(|(_, f)| f.len()).sum::<usize>();
            return (!frames.is_empty()).then(|| batch.bytes.slice(offset..));
        }
        let kept: Vec<&Bytes> = frames
            .iter()
            .filter(|(c, _)| (self.keep)(c))
            .map(|(_, f)| f)
            .collect();
        match kept.as_slice() {
            [] => None,
            [one] => Some((*one).clone()),
            many => Some(Bytes::from(
                many.iter()
                    .flat_map(|f| f.iter().copied())
                    .collect::<Vec<u8>>(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::log::{Cause, ChangeKind};
    use crate::engine::record::{RecordId, Timestamp, Version};
    use crate::engine::settle::Activity;
    use futures_util::StreamExt;
    use std::future::Future;

    fn append(log: &ChangeLog, table: &str, n: u64) {
        let table: Arc<str> = table.into();
        let id = RecordId::parse(&format!("r{n}")).unwrap();
        let version = Version::delete(Timestamp::now());
        log.append(
            &table,
            id,
            ChangeKind::Deleted,
            version,
            None,
            &Cause::request("t"),
            None,
        );
    }

    /// The `id:` of every change frame in `bytes`, and whether a `lagged`
    /// event came.
    fn ids(bytes: &[u8]) -> (Vec<u64>, bool) {
        let text = String::from_utf8_lossy(bytes);
        let ids = text
            .lines()
            .filter_map(|l| l.strip_prefix("id: "))
            .map(|n| n.parse().unwrap())
            .collect();
        (ids, text.contains("event: lagged"))
    }

    /// Polls `future` once, keeping it for later; whether it was ready.
    async fn poll_once(future: &mut (impl Future + Unpin)) -> bool {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::pin::Pin::new(&mut *future).poll(cx).is_ready())
        })
        .await
    }

    /// Reads `stream` until it has `want` ids or ends.
    async fn read(
        stream: &mut (impl Stream<Item = Result<Bytes, Infallible>> + Unpin),
        want: usize,
    ) -> (Vec<u64>, bool) {
        read_on(stream, Vec::new(), want).await
    }

    /// [`read`], after `bytes` already read.
    async fn read_on(
        stream: &mut (impl Stream<Item = Result<Bytes, Infallible>> + Unpin),
        mut bytes: Vec<u8>,
        want: usize,
    ) -> (Vec<u64>, bool) {
        loop {
            let (got, lagged) = ids(&bytes);
            if got.len() >= want || lagged {
                return (got, lagged);
            }
            match stream.next().await {
                Some(Ok(chunk)) => bytes.extend_from_slice(&chunk),
                None => return ids(&bytes),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_falls_behind_the_channel_catches_up_from_the_log() {
        let log = Arc::new(ChangeLog::new(100_000, Activity::default()));
        let stopping = CancellationToken::new();
        let fanout = Fanout::start(log.clone(), stopping.clone());
        let mut all = Box::pin(fanout.stream(log.clone(), 0, |_| true));
        let mut only_b = Box::pin(fanout.stream(log.clone(), 0, |c| &*c.table == "b"));
        // `all` waits for a batch (so the fanout publishes), then is not
        // read while far more batches than the channel holds go by.
        let mut first = all.next();
        assert!(!poll_once(&mut first).await);
        let mut n = 0;
        for _ in 0..CHANNEL * 2 {
            for table in ["a", "b", "a"] {
                n += 1;
                append(&log, table, n);
            }
            tokio::time::sleep(TICK * 2).await;
        }
        let Some(Ok(chunk)) = first.await else {
            panic!("the stream ended")
        };
        let (got, lagged) = read_on(&mut all, chunk.to_vec(), n as usize).await;
        assert!(!lagged);
        assert_eq!(got, (1..=n).collect::<Vec<_>>());
        let (got, _) = read(&mut only_b, CHANNEL * 2).await;
        assert_eq!(got, (1..=n).filter(|s| s % 3 == 2).collect::<Vec<_>>());
        // And live from there, through the channel.
        n += 1;
        append(&log, "a", n);
        let (got, _) = read(&mut all, 1).await;
        assert_eq!(got, [n]);
        stopping.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_recorded_while_every_stream_was_busy_still_reaches_them() {
        let log = Arc::new(ChangeLog::new(1000, Activity::default()));
        let fanout = Fanout::start(log.clone(), CancellationToken::new());
        let mut stream = Box::pin(fanout.stream(log.clone(), 0, |_| true));
        // Each change n is recorded while the stream waits for a batch.
        for n in 1..=2 {
            let mut next = stream.next();
            assert!(
                !poll_once(&mut next).await,
                "caught up, waiting for a batch"
            );
            append(&log, "a", n);
            let Some(Ok(chunk)) = next.await else {
                panic!("the stream ended")
            };
            assert_eq!(ids(&chunk).0, [n]);
        }
        // Now the stream is not waiting (its client is being sent the last
        // batch) when the next change is recorded and the fanout wakes.
        append(&log, "a", 3);
        tokio::time::sleep(TICK * 3).await;
        let got = tokio::time::timeout(Duration::from_secs(60), read(&mut stream, 1)).await;
        assert_eq!(got.expect("the change never came").0, [3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_whose_next_change_is_gone_gets_lagged_and_ends() {
        let log = Arc::new(ChangeLog::new(10, Activity::default()));
        let fanout = Fanout::start(log.clone(), CancellationToken::new());
        let mut stream = Box::pin(fanout.stream(log.clone(), 0, |_| true));
        for n in 1..=50 {
            append(&log, "a", n);
        }
        tokio::time::sleep(TICK * 2).await;
        let (_, lagged) = read(&mut stream, usize::MAX).await;
        assert!(lagged);
        assert!(
            stream.next().await.is_none(),
            "the stream ends after `lagged`"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_joining_after_changes_no_one_watched_misses_none() {
        let log = Arc::new(ChangeLog::new(1000, Activity::default()));
        let fanout = Fanout::start(log.clone(), CancellationToken::new());
        for n in 1..=5 {
            append(&log, "a", n);
        }
        // Nobody watches: the fanout skips these.
        tokio::time::sleep(TICK * 2).await;
        let mut stream = Box::pin(fanout.stream(log.clone(), 2, |_| true));
        append(&log, "a", 6);
        let (got, _) = read(&mut stream, 4).await;
        assert_eq!(got, [3, 4, 5, 6]);
    }
}
