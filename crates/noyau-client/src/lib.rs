//! noyau-client
