use clap::Parser;
use kvgate::cli::{self, Cli, Command};
use kvgate::config::Config;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kvgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.command {
        Some(Command::CheckConfig { config }) => match Config::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        },
        Some(Command::Demo { listen }) => runtime.block_on(kvgate::demo::run(&listen)),
        None => args.run.resolve().and_then(|cfg| {
            cli::init_logging(&cfg.log.level);
            runtime.block_on(cli::run(cfg))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvgate: {e}");
            ExitCode::FAILURE
        }
    }
}
