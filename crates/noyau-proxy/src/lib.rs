//! noyau-proxy
