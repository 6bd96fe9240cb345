//! noyau-link
