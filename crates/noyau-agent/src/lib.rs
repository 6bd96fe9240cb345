//! noyau-agent
