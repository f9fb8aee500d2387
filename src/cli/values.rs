//! Argument values shared by both command lines that clap cannot derive: the device (`cuda:N` carries
//! a number). Arch, mode and dtype are `clap::ValueEnum`s where they are defined.

use clap::builder::{PossibleValue, TypedValueParser};
use clap::error::{ContextKind, ContextValue, ErrorKind};

use crate::engine::DeviceChoice;

/// `--device auto|cpu|cuda|cuda:N`, parsed by [`DeviceChoice`]'s `FromStr`; `--help` lists the
/// values and a bad one is a usage error (exit 2) like any other.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceParser;

impl DeviceParser {
    fn values() -> [PossibleValue; 4] {
        [
            PossibleValue::new("auto").help("CUDA device 0 when there is one, else the CPU"),
            PossibleValue::new("cpu"),
            PossibleValue::new("cuda").help("CUDA device 0"),
            PossibleValue::new("cuda:N").help("CUDA device N"),
        ]
    }
}

impl TypedValueParser for DeviceParser {
    type Value = DeviceChoice;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<DeviceChoice, clap::Error> {
        let text = value.to_string_lossy();
        text.parse().map_err(|_: String| {
            let mut e = clap::Error::new(ErrorKind::InvalidValue).with_cmd(cmd);
            let arg = arg.map(ToString::to_string).unwrap_or_else(|| "--device".into());
            e.insert(ContextKind::InvalidArg, ContextValue::String(arg));
            e.insert(ContextKind::InvalidValue, ContextValue::String(text.into_owned()));
            let valid = Self::values().iter().map(|v| v.get_name().to_string()).collect();
            e.insert(ContextKind::ValidValue, ContextValue::Strings(valid));
            e
        })
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(Self::values().into_iter()))
    }
}
