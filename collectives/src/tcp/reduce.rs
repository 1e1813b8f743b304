//! Element-wise reductions of byte buffers holding f32, f64 or i64 values.

use super::raw::{elements, elements_mut, Plain};
use crate::ReduceOp;
use tch::Kind;

/// Element types the reductions understand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Elem {
    F32,
    F64,
    I64,
}

impl Elem {
    pub(super) fn of(kind: Kind) -> Option<Elem> {
        match kind {
            Kind::Float => Some(Elem::F32),
            Kind::Double => Some(Elem::F64),
            Kind::Int64 => Some(Elem::I64),
            _ => None,
        }
    }
    pub(super) fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::F64 | Elem::I64 => 8,
        }
    }
    pub(super) fn code(self) -> u32 {
        self as u32
    }
}

trait Reducible: Plain {
    fn combine(self, other: Self, op: ReduceOp) -> Self;
    fn divide(self, count: usize) -> Self;
}

/// Floating-point reductions: IEEE addition and max, division by the rank count for Avg.
macro_rules! reducible_float {
    ($t:ty) => {
        impl Reducible for $t {
            #[inline]
            fn combine(self, other: Self, op: ReduceOp) -> Self {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => self + other,
                    ReduceOp::Max => self.max(other),
                }
            }
            fn divide(self, count: usize) -> Self {
                self / count as $t
            }
        }
    };
}
reducible_float!(f32);
reducible_float!(f64);

impl Reducible for i64 {
    #[inline]
    fn combine(self, other: Self, op: ReduceOp) -> Self {
        match op {
            ReduceOp::Sum | ReduceOp::Avg => self.wrapping_add(other),
            ReduceOp::Max => self.max(other),
        }
    }
    fn divide(self, count: usize) -> Self {
        self / count as i64
    }
}

fn combine_into<T: Reducible>(dst: &mut [T], src: &[T], op: ReduceOp) {
    match op {
        // Separate loops so the compiler vectorises each.
        ReduceOp::Sum | ReduceOp::Avg => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = d.combine(s, ReduceOp::Sum);
            }
        }
        ReduceOp::Max => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = d.combine(s, ReduceOp::Max);
            }
        }
    }
}

/// `dst = dst op src`, element-wise; both start at an element boundary of aligned storage.
pub(super) fn reduce_bytes(elem: Elem, op: ReduceOp, dst: &mut [u8], src: &[u8]) {
    match elem {
        Elem::F32 => combine_into(elements_mut::<f32>(dst), elements::<f32>(src), op),
        Elem::F64 => combine_into(elements_mut::<f64>(dst), elements::<f64>(src), op),
        Elem::I64 => combine_into(elements_mut::<i64>(dst), elements::<i64>(src), op),
    }
}

/// Divides every element by `count` (the last step of Avg).
pub(super) fn divide_bytes(elem: Elem, values: &mut [u8], count: usize) {
    fn divide_all<T: Reducible>(values: &mut [T], count: usize) {
        for value in values {
            *value = value.divide(count);
        }
    }
    match elem {
        Elem::F32 => divide_all(elements_mut::<f32>(values), count),
        Elem::F64 => divide_all(elements_mut::<f64>(values), count),
        Elem::I64 => divide_all(elements_mut::<i64>(values), count),
    }
}
