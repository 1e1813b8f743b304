//! `mgrun methods`: every method's descriptor, as a user choosing one needs it.

use anyhow::Result;
use mgrun_methods::METHODS;

pub fn print_methods() -> Result<()> {
    for method in METHODS {
        println!("{} (DomainBed: {}): {}", method.name, method.domainbed_name, method.summary);
        println!("    reference: {}", method.reference);
        let defaults = method.defaults()?;
        println!("    crosses ranks each step (defaults; one rank: nothing):");
        for stat in method.cross_rank_statistics(&defaults)? {
            println!("        {stat}");
        }
        for ((key, default, doc), h) in method.documented_defaults()?.into_iter().zip(method.hyperparameters) {
            let search = h.search.map(|(name, search)| format!(" [sweep: {name} ~ {search}]")).unwrap_or_default();
            println!("    {key} = {default}    # {doc}{search}");
        }
    }
    Ok(())
}
