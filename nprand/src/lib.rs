//! numpy's legacy `np.random.RandomState` and DomainBed's `misc.seed_hash`, reproduced bit for bit.
//!
//! DomainBed derives its data splits and random hyperparameter search from these two functions, so a port
//! that must pick the same images and the same hyperparameters needs the identical streams:
//!
//! - [`RandomState::new`]`(seed)` is `np.random.RandomState(seed)` for an integer seed: MT19937 seeded with
//!   the reference `init_genrand` (numpy's `mt19937_seed`).
//! - [`RandomState::random_sample`] / [`RandomState::uniform`] use numpy's 53-bit double
//!   (`(a >> 5) * 2^26 + (b >> 6)) / 2^53`).
//! - [`RandomState::randint`] / [`RandomState::choice`] use numpy's legacy masked rejection sampling
//!   (`RandomState.randint(low, high)` with the default `int64` dtype; `choice(a)` is `a[randint(0, len(a))]`).
//! - [`RandomState::shuffle`] / [`RandomState::permutation`] are numpy's Fisher-Yates from the end with
//!   `random_interval` (masked rejection on 32-bit draws).
//!
//! [`seed_hash`] is DomainBed's `int(md5(str(args)).hexdigest(), 16) % 2**31`, with `str(args)` built from
//! [`PyArg`]s exactly as Python prints a tuple.
//!
//! ```
//! use mgrun_nprand::{seed_hash, PyArg, RandomState};
//! // DomainBed's split of environment 1 for trial_seed 0: misc.seed_hash(0, 1).
//! let seed = seed_hash(&[PyArg::Int(0), PyArg::Int(1)]);
//! let mut keys: Vec<usize> = (0..10).collect();
//! RandomState::new(seed).shuffle(&mut keys);
//! ```

use md5::{Digest, Md5};
use rand_mt::Mt;
use std::fmt;

/// A bad argument to a sampling call (numpy raises `ValueError` for the same cases).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpRandError(String);

impl fmt::Display for NpRandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NpRandError {}

/// numpy's legacy `RandomState` generator (MT19937). Draws are identical to numpy's for the same seed and
/// the same sequence of calls.
#[derive(Clone)]
pub struct RandomState {
    mt: Mt,
}

impl fmt::Debug for RandomState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RandomState { .. }")
    }
}

impl RandomState {
    /// `np.random.RandomState(seed)`; numpy accepts integer seeds in `0..=2**32 - 1`, all of `u32`.
    pub fn new(seed: u32) -> Self {
        RandomState { mt: Mt::new(seed) }
    }

    /// One raw 32-bit MT19937 output (numpy's `next_uint32`, `randint(0, 2**32, dtype=np.uint32)`).
    pub fn next_u32(&mut self) -> u32 {
        self.mt.next_u32()
    }

    /// numpy's `next_uint64` for MT19937: the first 32-bit draw is the high half.
    fn next_u64(&mut self) -> u64 {
        let high = u64::from(self.next_u32());
        (high << 32) | u64::from(self.next_u32())
    }

    /// `random_sample()`: a double in `[0, 1)` with 53 random bits from two 32-bit draws.
    pub fn random_sample(&mut self) -> f64 {
        let a = self.next_u32() >> 5;
        let b = self.next_u32() >> 6;
        (f64::from(a) * 67_108_864.0 + f64::from(b)) / 9_007_199_254_740_992.0
    }

    /// `uniform(low, high)`: `low + (high - low) * random_sample()`.
    pub fn uniform(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.random_sample()
    }

    /// `randint(low, high)`: an integer in `[low, high)` by numpy's legacy masked rejection sampling.
    pub fn randint(&mut self, low: i64, high: i64) -> Result<i64, NpRandError> {
        if low >= high {
            return Err(NpRandError(format!("randint: low >= high ({low} >= {high})")));
        }
        // Inclusive range width; the wrapping arithmetic is exact because high - 1 - low < 2**64.
        let range = (high - 1).wrapping_sub(low) as u64;
        Ok(low.wrapping_add(self.bounded_masked(range) as i64))
    }

    /// A value in `[0, max]` (inclusive) the way numpy's `random_bounded_uint64_fill` draws it with
    /// `use_masked=True`: 32-bit draws for ranges that fit, 64-bit draws otherwise.
    fn bounded_masked(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        if max == u64::from(u32::MAX) {
            return u64::from(self.next_u32());
        }
        if max == u64::MAX {
            return self.next_u64();
        }
        let mask = smallest_mask(max);
        if max <= u64::from(u32::MAX) {
            loop {
                let value = u64::from(self.next_u32()) & mask;
                if value <= max {
                    return value;
                }
            }
        }
        loop {
            let value = self.next_u64() & mask;
            if value <= max {
                return value;
            }
        }
    }

    /// numpy's `random_interval(max)`: a value in `[0, max]` used by `shuffle`.
    fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mask = smallest_mask(max);
        loop {
            let value =
                if max <= u64::from(u32::MAX) { u64::from(self.next_u32()) & mask } else { self.next_u64() & mask };
            if value <= max {
                return value;
            }
        }
    }

    /// `shuffle(x)` in place: for `i` from `len - 1` down to 1, swap `x[i]` with `x[random_interval(i)]`.
    /// Same draws for a Python list and a 1-d array.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.interval(i as u64) as usize;
            items.swap(i, j);
        }
    }

    /// `permutation(n)`: `arange(n)` shuffled.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        self.shuffle(&mut order);
        order
    }

    /// `choice(n)` / the index `choice(a)` picks for `len(a) == n`: `randint(0, n)`.
    pub fn choice_index(&mut self, n: usize) -> Result<usize, NpRandError> {
        if n == 0 {
            return Err(NpRandError("choice: a must be non-empty".to_string()));
        }
        Ok(self.randint(0, n as i64)? as usize)
    }

    /// `choice(a)` for a sequence, with replacement and uniform probabilities (DomainBed's `r.choice([...])`).
    pub fn choice<'a, T>(&mut self, items: &'a [T]) -> Result<&'a T, NpRandError> {
        let index = self.choice_index(items.len())?;
        Ok(&items[index])
    }
}

/// The smallest all-ones bit mask that covers `max` (numpy's `gen_mask`).
fn smallest_mask(max: u64) -> u64 {
    if max == 0 {
        0
    } else {
        u64::MAX >> max.leading_zeros()
    }
}

/// One element of the Python tuple whose `str()` DomainBed hashes.
#[derive(Debug, Clone, PartialEq)]
pub enum PyArg {
    /// A Python `int`, printed in decimal.
    Int(i64),
    /// A Python `str`, printed with `repr` (single quotes unless the text contains `'` and no `"`).
    Str(String),
    /// A Python list of ints, e.g. DomainBed's `test_envs` `[0, 1]`.
    IntList(Vec<i64>),
    /// A Python `bool` (`True`/`False`).
    Bool(bool),
}

impl From<i64> for PyArg {
    fn from(value: i64) -> Self {
        PyArg::Int(value)
    }
}

impl From<&str> for PyArg {
    fn from(value: &str) -> Self {
        PyArg::Str(value.to_string())
    }
}

impl fmt::Display for PyArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PyArg::Int(value) => write!(f, "{value}"),
            PyArg::Bool(value) => f.write_str(if *value { "True" } else { "False" }),
            PyArg::Str(text) => f.write_str(&python_str_repr(text)),
            PyArg::IntList(values) => {
                let items: Vec<String> = values.iter().map(i64::to_string).collect();
                write!(f, "[{}]", items.join(", "))
            }
        }
    }
}

/// Python's `repr(str)` for printable text: quote choice and escapes of `\\`, the quote, `\n`, `\r`, `\t`.
fn python_str_repr(text: &str) -> String {
    let quote = if text.contains('\'') && !text.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(text.len() + 2);
    out.push(quote);
    for ch in text.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// `str(args)` for a tuple of `args`, exactly as Python prints it: `(0, 1)`, `(5,)`, `('PACS', 'ERM', [0])`.
pub fn python_tuple_repr(args: &[PyArg]) -> String {
    let items: Vec<String> = args.iter().map(PyArg::to_string).collect();
    match items.len() {
        1 => format!("({},)", items[0]),
        _ => format!("({})", items.join(", ")),
    }
}

/// DomainBed's `misc.seed_hash(*args)`: `int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % 2**31`.
pub fn seed_hash(args: &[PyArg]) -> u32 {
    let digest = Md5::digest(python_tuple_repr(args).as_bytes());
    // The 128-bit value mod 2**31 only depends on its low 31 bits: the last four digest bytes, big-endian.
    let low = u32::from_be_bytes([digest[12], digest[13], digest[14], digest[15]]);
    low & 0x7fff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_mt19937_output_for_seed_5489() {
        // The 10,000th output of the reference generator seeded with 5489 (C++ std::mt19937 guarantees it).
        let mut rs = RandomState::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = rs.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn tuple_repr_matches_python() {
        assert_eq!(python_tuple_repr(&[PyArg::Int(0), PyArg::Int(1)]), "(0, 1)");
        assert_eq!(python_tuple_repr(&[PyArg::Int(5)]), "(5,)");
        assert_eq!(python_tuple_repr(&[]), "()");
        let args = [
            PyArg::from("PACS"),
            PyArg::from("ERM"),
            PyArg::IntList(vec![0, 2]),
            PyArg::Int(3),
            PyArg::Bool(true),
            PyArg::from("it's"),
        ];
        assert_eq!(python_tuple_repr(&args), "('PACS', 'ERM', [0, 2], 3, True, \"it's\")");
    }

    #[test]
    fn argument_errors_name_the_call() {
        let mut rs = RandomState::new(0);
        assert!(rs.randint(3, 3).unwrap_err().to_string().contains("randint"));
        assert!(rs.choice::<u8>(&[]).unwrap_err().to_string().contains("non-empty"));
        assert_eq!(rs.randint(7, 8).unwrap(), 7);
    }

    #[test]
    fn masks() {
        assert_eq!(smallest_mask(1), 1);
        assert_eq!(smallest_mask(5), 7);
        assert_eq!(smallest_mask(8), 15);
        assert_eq!(smallest_mask(u64::from(u32::MAX) + 1), (1u64 << 33) - 1);
    }
}
