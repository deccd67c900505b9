//! The server's request queue. Waiting requests are taken into the batch round-robin across
//! clients, so one client's batch of fifty cannot starve another's one.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};

pub struct FairQueue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    capacity: usize,
}

struct State<T> {
    /// Clients with waiting requests, in the order they are served next.
    clients: VecDeque<(String, VecDeque<T>)>,
    len: usize,
    closed: bool,
}

impl<T> FairQueue<T> {
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State {
                clients: VecDeque::new(),
                len: 0,
                closed: false,
            }),
            ready: Condvar::new(),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        // A panic while holding the lock cannot leave the queue half-updated (every update is a
        // single push or pop), so the data is still good.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item` for `client`; gives it back if the queue is full or closed. Returns the
    /// number of requests ahead of it.
    pub fn push(&self, client: &str, item: T) -> Result<usize, T> {
        let mut s = self.lock();
        if s.closed || s.len >= self.capacity {
            return Err(item);
        }
        let ahead = s.len;
        match s.clients.iter_mut().find(|(c, _)| c == client) {
            Some((_, q)) => q.push_back(item),
            None => s
                .clients
                .push_back((client.to_string(), VecDeque::from([item]))),
        }
        s.len += 1;
        drop(s);
        self.ready.notify_one();
        Ok(ahead)
    }

    /// The next request, waiting for one; `None` once closed and drained.
    pub fn pop(&self) -> Option<T> {
        let mut s = self.lock();
        loop {
            if let Some(item) = Self::take(&mut s) {
                return Some(item);
            }
            if s.closed {
                return None;
            }
            s = self.ready.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The next request if one is waiting, without waiting.
    pub fn try_pop(&self) -> Option<T> {
        Self::take(&mut self.lock())
    }

    fn take(s: &mut State<T>) -> Option<T> {
        let (client, mut q) = s.clients.pop_front()?;
        let item = q.pop_front();
        if !q.is_empty() {
            // This client's next request goes behind every other client's.
            s.clients.push_back((client, q));
        }
        s.len -= 1;
        item
    }

    pub fn len(&self) -> usize {
        self.lock().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// No more pushes; `pop` drains what is left, then returns `None`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn round_robin_across_clients() {
        let q = FairQueue::new(10);
        for i in 1..=3 {
            q.push("a", format!("a{i}")).unwrap();
        }
        q.push("b", "b1".to_string()).unwrap();
        q.push("c", "c1".to_string()).unwrap();
        q.push("b", "b2".to_string()).unwrap();
        let order: Vec<String> = (0..6).map(|_| q.pop().unwrap()).collect();
        assert_eq!(order, ["a1", "b1", "c1", "a2", "b2", "a3"]);
        assert!(q.is_empty());
    }

    #[test]
    fn full_and_closed_queues_refuse() {
        let q = FairQueue::new(2);
        assert_eq!(q.push("a", 1), Ok(0));
        assert_eq!(q.push("b", 2), Ok(1));
        assert_eq!(q.push("c", 3), Err(3));
        q.close();
        assert_eq!(q.pop(), Some(1));
        assert_eq!(q.push("a", 4), Err(4));
        assert_eq!(q.pop(), Some(2));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn pop_waits_for_a_push() {
        let q = Arc::new(FairQueue::new(4));
        let q2 = q.clone();
        let t = std::thread::spawn(move || q2.pop());
        std::thread::sleep(std::time::Duration::from_millis(50));
        q.push("a", 7).unwrap();
        assert_eq!(t.join().unwrap(), Some(7));
        assert_eq!(q.try_pop(), None);
        q.push("b", 8).unwrap();
        assert_eq!(q.try_pop(), Some(8));
    }
}
