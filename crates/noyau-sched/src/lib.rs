//! noyau-sched
