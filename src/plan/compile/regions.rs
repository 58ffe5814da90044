//! `global;` and `on_partition`: limits counted across regions.

use super::*;

impl<'a> Compiler<'a> {
    /// Whether the limit is counted across regions, and its partition mode; `None` when a
    /// problem was reported.
    pub(super) fn global(
        &mut self,
        f: usize,
        settings: &Settings<'a>,
        algorithm: Option<Algorithm>,
        ok: &mut bool,
    ) -> Option<Option<OnPartition>> {
        let mode = self.keyword_or(
            f,
            settings.on_partition,
            "on_partition",
            PARTITION_MODES,
            OnPartition::Share,
        );
        let Some(span) = settings.global else {
            if let (true, Some(word)) = (settings.on_partition_explicit, settings.on_partition) {
                self.error_help(
                    f,
                    word.span,
                    "`on_partition` applies to limits counted across regions".to_owned(),
                    "without `global`",
                    "add `global;` to count this limit across regions, or remove `on_partition`",
                );
                *ok = false;
            }
            return Some(None);
        };
        let mut fail = |this: &mut Self, label: &str, message: String, help: &str| {
            this.error_help(f, span, message, label, help);
            *ok = false;
        };
        if settings.global_in_defaults {
            fail(
                self,
                "in `defaults`",
                "`global` is set in each limit, not in `defaults`".to_owned(),
                "counting across regions trades exactness for availability: choose it limit \
                 by limit",
            );
            return None;
        }
        if settings.sync.is_some() {
            fail(
                self,
                "with `sync every`",
                "a limit is local-first (`sync every`) or `global`, not both".to_owned(),
                "a `global` limit is exact within its region and exchanges its counts with \
                 the other regions every `region_sync_ms`",
            );
        }
        let windowed = |a: &Algorithm| matches!(a, Algorithm::FixedWindow | Algorithm::Calendar);
        if let Some(a) = algorithm.filter(|a| !windowed(a)) {
            fail(
                self,
                "not a window that counts",
                format!(
                    "a `global` limit counts in fixed windows, not `{}`",
                    a.name()
                ),
                "use `algorithm fixed_window;` or a calendar quota (`/day`, `/month`): each \
                 region's count of a window adds up to the whole",
            );
        }
        Some(mode)
    }
}
